"""INT4 quantization in the ``mobilemoe-int4-g32`` format (see :mod:`mobilemoe.quant.int4`),
quantization-aware training (:mod:`mobilemoe.quant.qat`) and checkpoint conversion
(:mod:`mobilemoe.quant.convert`)."""

from mobilemoe.quant.int4 import (
    GROUP_SIZE,
    QMAX,
    QMIN,
    dequantize,
    fake_quantize,
    pack_int4,
    quantize,
    unpack_int4,
)
from mobilemoe.quant.convert import (
    QuantizeError,
    QuantizeReport,
    int4_config,
    quantize_checkpoint,
    quantize_state_dict,
)
from mobilemoe.quant.qat import (
    QATError,
    fake_quantize_int8_per_token,
    fake_quantize_ste,
    is_qat,
    prepare_qat,
    qat_weights,
    remove_qat,
)

__all__ = ["GROUP_SIZE", "QMAX", "QMIN", "dequantize", "fake_quantize", "pack_int4", "quantize", "unpack_int4",
           "QuantizeError", "QuantizeReport", "int4_config", "quantize_checkpoint",
           "quantize_state_dict", "QATError", "fake_quantize_int8_per_token", "fake_quantize_ste", "is_qat",
           "prepare_qat", "qat_weights", "remove_qat"]
