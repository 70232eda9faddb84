"""mpqkit: mixed-precision quantization toolkit.

The public API::

    from mpqkit import Policy, QuantConfig, quantize_model, calibrate, profile_model, build_model
"""

__version__ = "0.1.0"

from mpqkit.complexity import LayerInfo, compute_complexity, profile_model  # noqa: E402
from mpqkit.errors import MpqkitError  # noqa: E402
from mpqkit.models import build_model  # noqa: E402
from mpqkit.policy import LayerPolicy, Policy  # noqa: E402
from mpqkit.quant import (  # noqa: E402
    QConv2d,
    QLinear,
    QuantConfig,
    calibrate,
    dequantize_model,
    model_bits,
    quantize_model,
)

__all__ = [
    "LayerInfo", "LayerPolicy", "MpqkitError", "Policy", "QConv2d", "QLinear", "QuantConfig",
    "__version__", "build_model", "calibrate", "compute_complexity", "dequantize_model",
    "model_bits", "profile_model", "quantize_model",
]
