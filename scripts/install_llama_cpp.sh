#!/usr/bin/env bash
# Install llama-cpp-python (llama.cpp built from source) into the venv whose python is $1.
#
# Built with GGML_NATIVE (the CPU's own ISA) but never with ggml's AMX matmul: -march=native turns
# it on by itself on AMX Xeons, where it dies with SIGILL at tilezero on batched Q4_0. The GGML_AMX_*
# options alone do not help under -march=native; GCC's explicit -mno-amx-* win over it.
#
# The wheel is cached under ~/.cache/mobilemoe/llama-cpp-wheels/<key>, the key hashing the version,
# the build options and this CPU's feature flags: pip's own wheel cache would hand a wheel built with
# other flags, or for another CPU, to this one.
set -euo pipefail
VPY="$1"
VERSION="0.3.36"
ARGS="-DGGML_NATIVE=ON -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF"
if [ "$(uname -m)" = "x86_64" ]; then
    NO_AMX="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
    ARGS="$ARGS -DCMAKE_C_FLAGS='$NO_AMX' -DCMAKE_CXX_FLAGS='$NO_AMX'"
fi
CPU_FLAGS="$(grep -m1 -E '^(flags|Features)' /proc/cpuinfo 2>/dev/null || uname -m)"
KEY="$(printf '%s\n%s\n%s\n' "$VERSION" "$ARGS" "$CPU_FLAGS" | sha256sum | cut -c1-16)"
CACHE="${XDG_CACHE_HOME:-$HOME/.cache}/mobilemoe/llama-cpp-wheels/$KEY"
WHEEL="$(ls "$CACHE"/llama_cpp_python-"$VERSION"-*.whl 2>/dev/null | head -n1 || true)"
if [ -z "$WHEEL" ]; then
    echo "building llama-cpp-python $VERSION from source (5-20 min, once per CPU): $ARGS"
    mkdir -p "$CACHE.tmp"
    CMAKE_ARGS="$ARGS" "$VPY" -m pip wheel --quiet --no-deps --no-cache-dir -w "$CACHE.tmp" "llama-cpp-python==$VERSION"
    rm -rf "$CACHE" && mv "$CACHE.tmp" "$CACHE"
    WHEEL="$(ls "$CACHE"/llama_cpp_python-"$VERSION"-*.whl | head -n1)"
fi
"$VPY" -m pip install --quiet "$WHEEL"
