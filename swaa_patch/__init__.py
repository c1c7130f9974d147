"""Alias package: the swaa cache patch under the name existing user code imports.

``from swaa_patch import hack_kv_cache_recurrent_state, unhack_kv_cache_recurrent_state`` gives the very
functions of ``swaa.cache``.
"""

from swaa.cache import hack_kv_cache_recurrent_state, unhack_kv_cache_recurrent_state

__all__ = ["hack_kv_cache_recurrent_state", "unhack_kv_cache_recurrent_state"]
