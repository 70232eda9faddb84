"""Quantizers, quantized layers and model conversion."""

from mpqkit.quant.convert import (
    calibrate,
    dequantize_model,
    model_bits,
    quantize_model,
)
from mpqkit.quant.layers import QConv2d, QLinear, QuantConfig, QuantMixin, register_qlayer
from mpqkit.quant.quantizers import (
    SUPPORTED_BITS,
    DoReFaQuantizer,
    LSQQuantizer,
    MaxAbsQuantizer,
    PACTQuantizer,
    Quantizer,
    check_bits,
    int_range,
    make_act_quantizer,
    make_weight_quantizer,
)

__all__ = [
    "SUPPORTED_BITS", "DoReFaQuantizer", "LSQQuantizer", "MaxAbsQuantizer", "PACTQuantizer",
    "QConv2d", "QLinear", "QuantConfig", "QuantMixin", "Quantizer", "calibrate", "check_bits",
    "dequantize_model", "int_range", "make_act_quantizer", "make_weight_quantizer", "model_bits",
    "quantize_model", "register_qlayer",
]
