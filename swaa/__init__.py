"""swaa: linear attention and gated linear attention inside Hugging Face transformers.

Four parts, one direction of dependency: ``swaa.cache`` (the KV-cache patch) and ``swaa.kernels``
(FLA on CUDA, exact torch elsewhere) know nothing of each other; ``swaa.layers`` builds drop-in
attention modules on both; ``swaa.convert`` turns pretrained models into hybrids with those layers.
"""

__version__ = "0.1.0"

# names resolved on first access, so `import swaa.kernels` does not pull in transformers
_LAZY = {
    "hack_kv_cache_recurrent_state": "swaa.cache",
    "unhack_kv_cache_recurrent_state": "swaa.cache",
    "LinearAttention": "swaa.layers",
    "GatedLinearAttention": "swaa.layers",
    "convert_to_hybrid": "swaa.convert",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'swaa' has no attribute {name!r}")
