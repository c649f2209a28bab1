"""Build of the native CPU kernels ``mobilemoe._C`` (metadata lives in pyproject.toml).

One torch extension in layers (each file named after what it holds):
  bindings.cpp      the Python module: ISA choice, operators, expert cache, native model
  model.cpp         NativeModel: the whole-model INT4 forward (orchestration over the operators)
  expert_cache.cpp  the RAM cache of offloaded routed experts (also used by remoe.device)
  op_linear.cpp, op_moe.cpp, op_attention.cpp   the operators (ops.h)
  thread_pool.cpp   the job pool every operator runs on
  dispatch.cpp      the ISA registry and the one cached ISA decision
  isa_*.cpp         the kernel tables, one unit per ISA, each compiled with its own flags:
    isa_portable.cpp  plain C++ (any CPU)
    isa_avx2.cpp      -mavx2 -mfma -mf16c
    isa_avx512.cpp    -mavx512f -mavx512bw -mavx512vl -mavx512vnni
    isa_avx512bf16.cpp  -mavx512bf16 (prefill attention, flash_attn.h)
    isa_amx.cpp       + -mavx512bf16 -mamx-tile -mamx-bf16 (prefill GEMMs on AMX-BF16 tiles where the OS grants them)
    isa_amx_attention.cpp  the same flags (prefill attention on AMX-BF16 tiles)
(the x86 units only on x86-64; isa_neon{,_dotprod,_i8mm}.cpp only on aarch64). Each ISA unit is compiled with its own flags (``BuildExt`` below) and picked at run time with
``__builtin_cpu_supports``, so the wheel builds and runs on a CPU without AVX-512.
Install with ``pip install --no-build-isolation -e '.[dev]'`` (the CPU torch must be importable).
"""

import os
import platform

from setuptools import setup
from torch.utils.cpp_extension import BuildExtension, CppExtension

CSRC = os.path.join("src", "mobilemoe", "kernels", "csrc")
COMMON_FLAGS = ["-O3", "-fopenmp", "-fno-math-errno", "-Wall", "-Wno-unused-function"]
ISA_STD = ["-std=c++17"]  # the layer units get the standard torch's BuildExtension picks for its headers
LAYER_UNITS = ("bindings.cpp", "model.cpp", "expert_cache.cpp", "op_linear.cpp", "op_moe.cpp", "op_attention.cpp",
               "thread_pool.cpp", "dispatch.cpp")
LAYER_HEADERS = ("mm_common.h", "dispatch.h", "ops.h", "thread_pool.h", "expert_cache.h", "flash_attn.h", "vec_math.h",
                 "arm_features.h", "amx.h")
ISA_UNITS = {"isa_portable.cpp": []}
if platform.machine().lower() in ("x86_64", "amd64"):  # elsewhere (e.g. aarch64) only the portable unit
    ISA_UNITS["isa_avx2.cpp"] = ["-mavx2", "-mfma", "-mf16c"]
    ISA_UNITS["isa_avx512.cpp"] = ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512vnni", "-mfma", "-mf16c"]
    ISA_UNITS["isa_amx.cpp"] = ISA_UNITS["isa_avx512.cpp"] + ["-mavx512bf16", "-mamx-tile", "-mamx-bf16"]
    ISA_UNITS["isa_amx_attention.cpp"] = ISA_UNITS["isa_amx.cpp"]
    ISA_UNITS["isa_avx512bf16.cpp"] = ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512bf16", "-mfma", "-mf16c"]
elif platform.machine().lower() in ("aarch64", "arm64"):
    # The baseline runs on Armv8.0 (Cortex-A53); i8mm is built for 8.2 + the feature, not 8.6, so
    # Armv8.4 cores with i8mm (Neoverse V1) get no instruction they lack. Picked at run time.
    ISA_UNITS["isa_neon.cpp"] = ["-march=armv8-a"]
    ISA_UNITS["isa_neon_dotprod.cpp"] = ["-march=armv8.2-a+dotprod"]
    ISA_UNITS["isa_neon_i8mm.cpp"] = ["-march=armv8.2-a+dotprod+i8mm"]


class BuildExt(BuildExtension):
    """Compiles the per-ISA units with their own -m flags, then links them into mobilemoe._C."""

    def build_extension(self, ext):
        if ext.name == "mobilemoe._C":
            objects = []
            for unit, flags in ISA_UNITS.items():
                objects += self.compiler.compile(
                    [os.path.join(CSRC, unit)],
                    output_dir=os.path.join(self.build_temp, "isa_" + os.path.splitext(unit)[0]),
                    include_dirs=[os.path.abspath(CSRC)],
                    extra_postargs=COMMON_FLAGS + ISA_STD + flags,
                    depends=[os.path.join(CSRC, h) for h in ("mm_common.h", "flash_attn.h", "vec_math.h", "neon_kernels.h", "amx.h", "amx_tiles.h")],
                )
            ext.extra_objects = list(ext.extra_objects or []) + objects
        super().build_extension(ext)


setup(
    ext_modules=[
        CppExtension(
            name="mobilemoe._C",
            sources=[os.path.join(CSRC, f) for f in LAYER_UNITS],
            include_dirs=[os.path.abspath(CSRC)],
            extra_compile_args=COMMON_FLAGS,
            extra_link_args=["-fopenmp"],
            depends=[os.path.join(CSRC, h) for h in LAYER_HEADERS],
        )
    ],
    cmdclass={"build_ext": BuildExt},
)
