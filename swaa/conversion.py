"""What a saved hybrid's config says about its conversion, as facts every room reads: the config
attribute that holds the record, and the conversion kinds with the ``swaa.layers`` class each names.

Pure Python, beneath the layers (their save guard reads the record), the converter (which writes and
checks it, :mod:`swaa.convert.record`) and the application (the CLI's ``--kind`` choices).
"""

from __future__ import annotations

__all__ = ["KINDS", "RECORD_KEY"]

# config attribute holding the conversion; saved into config.json with the rest of the config
RECORD_KEY = "swaa_hybrid"

# conversion kind -> class name in swaa.layers
KINDS = {
    "gla": "GatedLinearAttention",
    "linear": "LinearAttention",
    "swa_gla": "SlidingWindowGatedLinearAttention",
    "swa_linear": "SlidingWindowLinearAttention",
}
