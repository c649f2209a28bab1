"""The normal install builds mobilemoe._C; fail loudly (not skip) when it is missing."""

from mobilemoe import kernels as K


def test_extension_is_built():
    assert K.is_available(), (
        "mobilemoe._C is not importable: the install did not build the native kernels "
        "(pip install --no-build-isolation -e '.[dev]')"
    )


def test_runtime_dispatch_reports_isas():
    isas = K.available_isas()
    assert isas[-1] == "portable" and set(isas) <= {"amx", "avx512", "avx2", "i8mm", "dotprod", "neon", "portable"}
    K.set_isa(None)
    assert K.active_isa() in isas
