"""swaa: linear attention and gated linear attention inside Hugging Face transformers.

Four parts, one direction of dependency: ``swaa.cache`` (the KV-cache patch) and ``swaa.kernels``
(FLA on CUDA, exact torch elsewhere) know nothing of each other; ``swaa.layers`` builds drop-in
attention modules on both; ``swaa.convert`` turns pretrained models into hybrids with those layers.

``import swaa`` registers the hybrid model classes with transformers' Auto classes, so a saved hybrid
loads with ``AutoModelForCausalLM.from_pretrained(path)``; that is why it imports transformers.
"""

__version__ = "0.1.0"

from swaa.cache import hack_kv_cache_recurrent_state, unhack_kv_cache_recurrent_state  # noqa: E402
from swaa.convert import attention_transfer, convert_to_hybrid  # noqa: E402  (registers the Auto classes)
from swaa.layers import GatedLinearAttention, LinearAttention  # noqa: E402

__all__ = [
    "GatedLinearAttention",
    "LinearAttention",
    "__version__",
    "attention_transfer",
    "convert_to_hybrid",
    "hack_kv_cache_recurrent_state",
    "unhack_kv_cache_recurrent_state",
]
