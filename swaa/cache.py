"""The recurrent-state cache patch: transformers cache layers learn to carry a linear-attention state.

A transformers ``Cache`` is a list of layer objects (``DynamicLayer``, ``DynamicSlidingWindowLayer``,
``StaticLayer``, quantized layers, ...) that each know how to update, reorder, crop, offload and reset
their keys and values. ``hack_kv_cache_recurrent_state()`` teaches every one of those classes (found by
walking the subclasses of transformers' layer base classes, so classes added by later releases are
covered too) to hold one recurrent state next to its keys, and to carry it through everything
``generate()`` does to a cache. ``unhack_kv_cache_recurrent_state()`` puts every patched class back
exactly as it was.

Layer API (every cache layer instance, after the hack):

- ``layer.state_update(recurrent_state, cache_kwargs=None)``: ``None`` returns the current state and
  changes nothing; a tensor or a tuple of tensors is stored as it is (no copy; it replaces the previous
  state) and returned. ``cache_kwargs`` entries:

  - ``"num_new_tokens": n`` adds ``n`` to the number of positions the layer has absorbed (padding
    included, exactly as the key length of a softmax layer counts them). A layer that holds no keys
    answers ``get_seq_length()`` and ``get_mask_sizes()`` with that count, so a model whose layer 0 is
    linear keeps correct positions and masks.
  - ``"init_state": True`` also records ``layer.recurrent_dtype`` and ``layer.recurrent_device`` (from
    the first tensor of a tuple).
- ``layer.get_recurrent_state()`` (None when empty), ``layer.set_recurrent_state(state)`` (``None``
  clears the state), ``layer.is_recurrent_state_initialized()`` and the attribute
  ``layer.recurrent_state_initialized``.
- ``layer.update(k, v, {"recurrent_state": s})`` (positional or ``cache_kwargs=``) behaves as the stock
  ``update`` and also stores ``s`` exactly as ``state_update(s, cache_kwargs)`` would.

Cache API (``Cache`` and every subclass):

- ``cache.state_update(recurrent_state, layer_idx, cache_kwargs=None)``: as the layer method; a missing
  layer is created with the cache's own layer class when the cache grows lazily (a plain
  ``DynamicCache()``), up to ``MAX_LAZY_LAYERS`` layers; a cache with a fixed set of layers (built from a
  config or a list) raises IndexError.
- ``cache.get_recurrent_state(layer_idx)`` (None for a missing or empty layer),
  ``cache.is_recurrent_state_initialized(layer_idx)`` (False for a missing layer).
- ``cache.update(k, v, layer_idx, {"recurrent_state": s})`` stores ``s`` on that layer.

Beyond the API:

- The state follows ``reorder_cache`` (beam search), ``batch_repeat_interleave``,
  ``batch_select_indices``, ``offload``/``prefetch`` and ``copy.deepcopy``; a tuple state is handled
  tensor by tensor. ``reset()`` clears the state and the token count.
- ``crop`` cannot roll a recurrent state back: on a layer that holds one (or has absorbed tokens into
  one) it raises RuntimeError, and ``cache.crop`` checks every layer before touching any.
- Bad input raises TypeError / ValueError / IndexError naming the argument and changes nothing.
- hack is idempotent (a second call also patches layer classes defined since the first one, e.g. in a
  modeling module imported later), unhack without hack does nothing, both are thread-safe, and the
  patch applies to caches created before it.

transformers >= 5.5 native linear-attention layers (``LinearAttentionCacheLayerMixin`` family, with
their ``recurrent_states`` dict): the swaa state of such a layer *is* their state slot 0.
``state_update(x)`` puts ``x`` itself into ``recurrent_states[0]`` and marks it initialized and
``has_previous_state[0]``; ``get_recurrent_state()`` reads slot 0 with transformers' own rule (None until
``has_previous_state[0]``), so a state written by native code through ``update_recurrent_state`` is
visible through the swaa API and the other way round. A native write into a slot that holds a swaa state
first detaches it, so transformers' in-place ``copy_`` never writes into a tensor the caller handed over,
and ``reset`` drops a swaa state instead of zeroing the caller's tensor. ``cache.get_recurrent_state(i,
state_idx)`` with ``state_idx`` other than 0 is answered by transformers' own method. While hacked, the
native layers also get ``batch_repeat_interleave`` / ``batch_select_indices`` for all their states.

Example::

    import torch
    from transformers import DynamicCache
    from swaa.cache import hack_kv_cache_recurrent_state, unhack_kv_cache_recurrent_state

    hack_kv_cache_recurrent_state()
    cache = DynamicCache()
    state = torch.zeros(2, 4, 8, 8)                   # [B, H, K, V]
    cache.state_update(state, 0, {"num_new_tokens": 5})
    assert cache.get_recurrent_state(0) is state
    assert cache.get_seq_length() == 5                # layer 0 holds only a state
    cache.reorder_cache(torch.tensor([1, 0]))         # the state follows beam search
    assert torch.equal(cache.get_recurrent_state(0), state[[1, 0]])
    cache.reset()
    assert cache.get_recurrent_state(0) is None
    unhack_kv_cache_recurrent_state()

``demo()`` prints these steps and what each one does.
"""

from __future__ import annotations

import functools
import numbers
import threading

import torch
from transformers import cache_utils as _cu

__all__ = [
    "MAX_LAZY_LAYERS",
    "demo",
    "hack_kv_cache_recurrent_state",
    "is_hacked",
    "unhack_kv_cache_recurrent_state",
]

# A lazily growing cache creates the missing layers of a `state_update`. No model has anywhere near this
# many layers; the bound turns a wrong `layer_idx` (10**9) into an immediate IndexError instead of a loop
# that allocates millions of layer objects.
MAX_LAZY_LAYERS = 4096

# instance attributes the patch keeps on a layer (plain layers; native layers keep the state in slot 0)
_STATE = "_swaa_recurrent_state"
_COUNT = "_swaa_num_tokens"
_HOME = "_swaa_state_device"
_OWNS_SLOT0 = "_swaa_owns_slot0"

_NATIVE = getattr(_cu, "LinearAttentionCacheLayerMixin", None)
_LAYER_ROOTS = tuple(
    cls for cls in (_cu.CacheLayerMixin, _NATIVE, getattr(_cu, "DummyLayer", None)) if cls is not None
)
_MISSING = object()

_lock = threading.RLock()
_saved: dict[type, dict[str, object]] = {}  # class -> {attribute name: original value or _MISSING}
_hacked = False
# per-thread reentrancy bookkeeping: a subclass method that calls super() must not move the state twice
_tls = threading.local()


def _guards() -> set:
    guards = getattr(_tls, "guards", None)
    if guards is None:
        guards = _tls.guards = set()
    return guards


def _raw_depth() -> dict:
    depth = getattr(_tls, "raw", None)
    if depth is None:
        depth = _tls.raw = {}
    return depth


# validation


def _check_state(state, name: str = "recurrent_state") -> torch.Tensor:
    """Returns the state's first tensor, or raises TypeError/ValueError for anything but a tensor or a
    non-empty tuple of tensors."""
    if isinstance(state, torch.Tensor):
        return state
    if isinstance(state, tuple):
        if len(state) == 0:
            raise ValueError(f"`{name}` must be a tensor or a non-empty tuple of tensors, got an empty tuple")
        for i, item in enumerate(state):
            if not isinstance(item, torch.Tensor):
                raise TypeError(
                    f"`{name}` must be a tensor or a tuple of tensors, got a tuple whose item {i} is "
                    f"{type(item).__name__}"
                )
        return state[0]
    raise TypeError(f"`{name}` must be a tensor or a tuple of tensors, got {type(state).__name__}")


def _check_cache_kwargs(cache_kwargs, has_state: bool) -> None:
    if cache_kwargs is None:
        return
    if not isinstance(cache_kwargs, dict):
        raise TypeError(f"`cache_kwargs` must be a dict or None, got {type(cache_kwargs).__name__}")
    if "num_new_tokens" in cache_kwargs:
        n = cache_kwargs["num_new_tokens"]
        if isinstance(n, bool) or not isinstance(n, numbers.Integral):
            raise TypeError(
                f"`cache_kwargs['num_new_tokens']` must be an int, got {type(n).__name__} ({n!r})"
            )
        if n < 0:
            raise ValueError(f"`cache_kwargs['num_new_tokens']` must be >= 0, got {n}")
        if n > 0 and not has_state:
            raise ValueError(
                f"`cache_kwargs['num_new_tokens']` = {n} was given without a state: tokens are counted only "
                "when a new recurrent state that absorbed them is stored"
            )


def _check_layer_idx(layer_idx) -> int:
    if isinstance(layer_idx, bool) or not isinstance(layer_idx, numbers.Integral):
        raise TypeError(f"`layer_idx` must be an int, got {type(layer_idx).__name__} ({layer_idx!r})")
    if layer_idx < 0:
        raise IndexError(f"`layer_idx` must be >= 0, got {layer_idx}")
    return int(layer_idx)


def _state_kwarg(args, kwargs):
    """The `cache_kwargs` of an `update` call if it carries a recurrent state, else None (kept lean: it runs
    on every key/value update of every layer)."""
    cache_kwargs = args[0] if args else kwargs.get("cache_kwargs")
    if isinstance(cache_kwargs, dict) and "recurrent_state" in cache_kwargs:
        return cache_kwargs
    return None


# where a layer keeps its state: the one place that knows plain layers from native linear-attention ones


def _is_native(layer) -> bool:
    return _NATIVE is not None and isinstance(layer, _NATIVE)


def _read(layer):
    if _is_native(layer):
        # transformers' own rule: a slot is meaningful once `has_previous_state` says so
        if layer.has_previous_state.get(0) and layer.is_recurrent_states_initialized.get(0):
            return layer.recurrent_states.get(0)
        return None
    return layer.__dict__.get(_STATE)


def _owned(layer):
    """The state the patch put there (what it must move in batch operations), or None."""
    if _is_native(layer):
        return layer.recurrent_states.get(0) if layer.__dict__.get(_OWNS_SLOT0) else None
    return layer.__dict__.get(_STATE)


def _put(layer, state) -> None:
    if _is_native(layer):
        layer.recurrent_states[0] = state
        layer.is_recurrent_states_initialized[0] = True
        layer.has_previous_state[0] = True
        layer.__dict__[_OWNS_SLOT0] = True
    else:
        layer.__dict__[_STATE] = state
        layer.recurrent_state_initialized = True


def _detach_native_slot(layer) -> None:
    """Empties a native slot 0 that holds a swaa state, so transformers' code never touches it."""
    layer.recurrent_states[0] = None
    layer.is_recurrent_states_initialized[0] = False
    layer.__dict__.pop(_OWNS_SLOT0, None)


def _drop(layer) -> None:
    if _is_native(layer):
        if layer.__dict__.get(_OWNS_SLOT0):
            _detach_native_slot(layer)
        if 0 in layer.has_previous_state:
            layer.has_previous_state[0] = False
    else:
        layer.__dict__.pop(_STATE, None)
        layer.recurrent_state_initialized = False
    layer.__dict__.pop(_HOME, None)


def _store(layer, state, cache_kwargs) -> None:
    first = state[0] if isinstance(state, tuple) else state
    _put(layer, state)
    # where the state lives, so `prefetch` can bring it back after `offload`
    layer.__dict__[_HOME] = first.device
    if cache_kwargs:
        if cache_kwargs.get("init_state"):
            layer.recurrent_dtype = first.dtype
            layer.recurrent_device = first.device
        n = cache_kwargs.get("num_new_tokens")
        if n:
            layer.__dict__[_COUNT] = layer.__dict__.get(_COUNT, 0) + int(n)


def _map_state(state, fn):
    if isinstance(state, tuple):
        return tuple(fn(t) for t in state)
    return fn(state)


def _kv_length(layer):
    """What the stock `get_seq_length` says, ignoring the token count of the patch."""
    depth = _raw_depth()
    key = id(layer)
    depth[key] = depth.get(key, 0) + 1
    try:
        return layer.get_seq_length()
    finally:
        depth[key] -= 1
        if not depth[key]:
            del depth[key]


# methods added to every layer class


def _layer_state_update(self, recurrent_state, cache_kwargs=None):
    """Stores (or, with None, reads) this layer's recurrent state.

    Args:
        recurrent_state (`torch.Tensor` or tuple of tensors or None):
            The new state, stored as it is (no copy; it replaces the previous one), e.g. `[B, H, K, V]` or
            `(kv_state [B, H, K, V], z_state [B, H, K])`. None returns the current state and changes nothing.
        cache_kwargs (`dict`, *optional*):
            `"num_new_tokens": n` adds `n` absorbed positions to the layer's count; `"init_state": True` records
            `recurrent_dtype` and `recurrent_device`. Other keys are ignored. Default: `None`.

    Returns:
        The stored state (None when reading an empty layer).
    """
    if recurrent_state is None:
        _check_cache_kwargs(cache_kwargs, has_state=False)
        return _read(self)
    _check_state(recurrent_state)
    _check_cache_kwargs(cache_kwargs, has_state=True)
    _store(self, recurrent_state, cache_kwargs)
    return recurrent_state


def _layer_get_recurrent_state(self):
    """Returns this layer's recurrent state, or None."""
    return _read(self)


def _layer_set_recurrent_state(self, state):
    """Stores `state` as this layer's recurrent state (no copy); None clears it (the token count stays)."""
    if state is None:
        _drop(self)
        return None
    _check_state(state, "state")
    _store(self, state, None)
    return state


def _layer_is_recurrent_state_initialized(self) -> bool:
    """Whether this layer holds a recurrent state."""
    return _read(self) is not None


def _native_batch_op(op_name):
    def method(self, arg):
        fn = _BATCH_FNS[op_name](self, arg)
        for states, flags in (
            (self.conv_states, self.is_conv_states_initialized),
            (self.recurrent_states, self.is_recurrent_states_initialized),
        ):
            for i, state in list(states.items()):
                if flags.get(i) and state is not None:
                    states[i] = _map_state(state, fn)
        # hybrid classes (linear + attention) put this mixin first in their MRO: their keys come next
        kv_method = getattr(super(_NATIVE, self), op_name, None)
        if kv_method is not None:
            kv_method(arg)

    method.__name__ = op_name
    method.__qualname__ = f"{_NATIVE.__name__}.{op_name}"
    method.__doc__ = (
        f"`{op_name}` for every conv and recurrent state of a linear-attention layer (added by swaa)."
    )
    # wrapped like the stock methods, so a swaa state in slot 0 is moved once, by the wrapper
    return _wrap_batch(method, op_name)


def _to_device_of(t, idx):
    return idx.to(t.device) if isinstance(idx, torch.Tensor) else idx


def _reorder_fn(layer, beam_idx):
    return lambda t: t.index_select(0, beam_idx.to(t.device))


def _repeat_fn(layer, repeats):
    return lambda t: t.repeat_interleave(repeats, dim=0)


def _select_fn(layer, indices):
    return lambda t: t[_to_device_of(t, indices), ...]


def _offload_fn(layer, _):
    return lambda t: t.to("cpu", non_blocking=True)


def _prefetch_fn(layer, _):
    home = layer.__dict__.get(_HOME)
    if home is None:
        return lambda t: t
    return lambda t: t if t.device == home else t.to(home, non_blocking=True)


_BATCH_FNS = {
    "reorder_cache": _reorder_fn,
    "batch_repeat_interleave": _repeat_fn,
    "batch_select_indices": _select_fn,
    "offload": _offload_fn,
    "prefetch": _prefetch_fn,
}
_BATCH_ARG = {
    "reorder_cache": "beam_idx",
    "batch_repeat_interleave": "repeats",
    "batch_select_indices": "indices",
}


# wrappers around the layer methods transformers already has


def _wrap_batch(orig, name):
    arg_name = _BATCH_ARG.get(name)

    @functools.wraps(orig)
    def wrapper(self, *args, **kwargs):
        guards = _guards()
        key = (id(self), name)
        if key in guards:
            return orig(self, *args, **kwargs)
        state = _owned(self)
        native = state is not None and _is_native(self)
        arg = None
        if arg_name is not None:
            arg = kwargs[arg_name] if arg_name in kwargs else (args[0] if args else None)
        guards.add(key)
        depth = _raw_depth()
        depth[id(self)] = depth.get(id(self), 0) + 1
        try:
            if native:
                _detach_native_slot(self)
            try:
                # stock methods test the length and then index the keys: they must see the KV length only
                out = orig(self, *args, **kwargs)
            except BaseException:
                if native:
                    _put(self, state)
                raise
            if state is not None:
                _put(self, _map_state(state, _BATCH_FNS[name](self, arg)))
        finally:
            guards.discard(key)
            depth[id(self)] -= 1
            if not depth[id(self)]:
                del depth[id(self)]
        return out

    return wrapper


def _wrap_reset(orig, name):
    @functools.wraps(orig)
    def wrapper(self, *args, **kwargs):
        guards = _guards()
        key = (id(self), name)
        if key in guards:
            return orig(self, *args, **kwargs)
        guards.add(key)
        try:
            # a native reset zeroes its buffers in place: the caller's tensor must leave first
            if _is_native(self) and self.__dict__.get(_OWNS_SLOT0):
                _detach_native_slot(self)
            out = orig(self, *args, **kwargs)
            _drop(self)
            self.__dict__.pop(_COUNT, None)
        finally:
            guards.discard(key)
        return out

    return wrapper


def _crop_refusal(layer) -> str | None:
    count = layer.__dict__.get(_COUNT, 0)
    if _read(layer) is not None or count:
        return (
            f"{type(layer).__name__} holds a recurrent state ({count} absorbed tokens), which cannot be rolled "
            "back: `crop` would leave a state that no longer matches the cached tokens. Rebuild the cache "
            "(or `reset` it and run the prefix again) instead"
        )
    return None


def _wrap_crop(orig, name):
    @functools.wraps(orig)
    def wrapper(self, *args, **kwargs):
        reason = _crop_refusal(self)
        if reason is not None:
            raise RuntimeError(f"cannot crop: {reason}")
        return orig(self, *args, **kwargs)

    return wrapper


def _wrap_update(orig, name):
    @functools.wraps(orig)
    def wrapper(self, key_states, value_states, *args, **kwargs):
        cache_kwargs = _state_kwarg(args, kwargs)
        if cache_kwargs is None:
            return orig(self, key_states, value_states, *args, **kwargs)
        guards = _guards()
        key = (id(self), name)
        if key in guards:
            return orig(self, key_states, value_states, *args, **kwargs)
        state = cache_kwargs["recurrent_state"]
        _check_state(state, "cache_kwargs['recurrent_state']")
        _check_cache_kwargs(cache_kwargs, has_state=True)
        guards.add(key)
        try:
            out = orig(self, key_states, value_states, *args, **kwargs)
        finally:
            guards.discard(key)
        _store(self, state, cache_kwargs)
        return out

    return wrapper


def _wrap_update_recurrent_state(orig, name):
    @functools.wraps(orig)
    def wrapper(self, recurrent_states, *args, **kwargs):
        state_idx = kwargs.get("state_idx", args[0] if args else 0)
        if state_idx == 0 and self.__dict__.get(_OWNS_SLOT0):
            # transformers copies into the slot in place; it must get a buffer of its own, not the caller's
            _detach_native_slot(self)
        return orig(self, recurrent_states, *args, **kwargs)

    return wrapper


def _wrap_get_seq_length(orig, name):
    @functools.wraps(orig)
    def wrapper(self, *args, **kwargs):
        n = orig(self, *args, **kwargs)
        count = self.__dict__.get(_COUNT, 0)
        if count and id(self) not in _raw_depth() and n == 0:
            return count
        return n

    return wrapper


def _wrap_get_mask_sizes(orig, name):
    @functools.wraps(orig)
    def wrapper(self, *args, **kwargs):
        count = self.__dict__.get(_COUNT, 0)
        if not count or id(self) in _raw_depth() or _kv_length(self) != 0:
            return orig(self, *args, **kwargs)
        # layers whose mask formula reads an integer token counter (sliding windows) answer as if they had
        # absorbed `count` tokens; the others read `get_seq_length`, which already reports the count
        saved = {
            attr: self.__dict__[attr]
            for attr in ("cumulative_length", "cumulative_length_int")
            if isinstance(self.__dict__.get(attr), int) and not isinstance(self.__dict__.get(attr), bool)
        }
        if not saved:
            return orig(self, *args, **kwargs)
        try:
            for attr in saved:
                self.__dict__[attr] = count
            return orig(self, *args, **kwargs)
        finally:
            self.__dict__.update(saved)

    return wrapper


_LAYER_WRAPPERS = {
    "update": _wrap_update,
    "reset": _wrap_reset,
    "crop": _wrap_crop,
    "get_seq_length": _wrap_get_seq_length,
    "get_mask_sizes": _wrap_get_mask_sizes,
    "update_recurrent_state": _wrap_update_recurrent_state,
    **{name: _wrap_batch for name in _BATCH_FNS},
}

_LAYER_ADDED = {
    "state_update": _layer_state_update,
    "get_recurrent_state": _layer_get_recurrent_state,
    "set_recurrent_state": _layer_set_recurrent_state,
    "is_recurrent_state_initialized": _layer_is_recurrent_state_initialized,
}


# Cache-level methods


def _cache_layers_for(cache):
    """The cache that holds the layers: EncoderDecoderCache keeps its decoder layers in `self_attention_cache`."""
    if not hasattr(cache, "layers") and hasattr(cache, "self_attention_cache"):
        return cache.self_attention_cache
    return cache


def _cache_state_update(self, recurrent_state, layer_idx, cache_kwargs=None):
    """Stores (or, with None, reads) the recurrent state of layer `layer_idx`.

    Args:
        recurrent_state (`torch.Tensor` or tuple of tensors or None):
            As in the layer method: stored as it is, e.g. `[B, H, K, V]`; None reads.
        layer_idx (`int`):
            The layer. A lazily growing cache (plain `DynamicCache()`) creates missing layers with its own layer
            class, up to `swaa.cache.MAX_LAZY_LAYERS`; a cache with a fixed set of layers raises IndexError.
        cache_kwargs (`dict`, *optional*):
            `"num_new_tokens"` and `"init_state"`, as in the layer method. Default: `None`.

    Returns:
        The stored state (None when reading a missing or empty layer).
    """
    target = _cache_layers_for(self)
    if target is not self:
        return target.state_update(recurrent_state, layer_idx, cache_kwargs)
    layer_idx = _check_layer_idx(layer_idx)
    if recurrent_state is None:
        _check_cache_kwargs(cache_kwargs, has_state=False)
        return self.layers[layer_idx].state_update(None) if layer_idx < len(self.layers) else None
    _check_state(recurrent_state)
    _check_cache_kwargs(cache_kwargs, has_state=True)
    _ensure_layer(self, layer_idx)
    return self.layers[layer_idx].state_update(recurrent_state, cache_kwargs)


def _ensure_layer(cache, layer_idx: int) -> None:
    layers = cache.layers
    if layer_idx < len(layers):
        return
    layer_class = getattr(cache, "layer_class_to_replicate", None)
    if layer_class is None:
        raise IndexError(
            f"`layer_idx` must be < {len(layers)}: this {type(cache).__name__} has a fixed set of {len(layers)} "
            f"layers (built from a config or a list of layers), got {layer_idx}"
        )
    if layer_idx >= MAX_LAZY_LAYERS:
        raise IndexError(
            f"`layer_idx` must be < swaa.cache.MAX_LAZY_LAYERS = {MAX_LAZY_LAYERS} for a lazily growing "
            f"{type(cache).__name__}, got {layer_idx}"
        )
    while len(layers) <= layer_idx:
        layers.append(layer_class())


def _cache_get_recurrent_state(self, layer_idx, state_idx=None):
    """Returns the recurrent state of layer `layer_idx` (None for a missing or empty layer).

    Args:
        layer_idx (`int`): The layer.
        state_idx (`int`, *optional*): For transformers' own linear-attention layers only: which of their state
            slots; slot 0 is the swaa state, other slots are answered by transformers. Default: `None` (slot 0).
    """
    target = _cache_layers_for(self)
    if target is not self:
        return target.get_recurrent_state(layer_idx, state_idx)
    layer_idx = _check_layer_idx(layer_idx)
    if layer_idx >= len(self.layers):
        return None
    layer = self.layers[layer_idx]
    if state_idx is not None and state_idx != 0:
        native_method = _saved.get(_cu.Cache, {}).get("get_recurrent_state", _MISSING)
        if _is_native(layer) and native_method is not _MISSING:
            return native_method(self, layer_idx, state_idx)
        raise ValueError(
            f"`state_idx` must be 0 or None for layer {layer_idx} ({type(layer).__name__}), which holds one "
            f"recurrent state, got {state_idx}"
        )
    getter = getattr(layer, "get_recurrent_state", None)
    return getter() if getter is not None else None


def _cache_is_recurrent_state_initialized(self, layer_idx) -> bool:
    """Whether layer `layer_idx` holds a recurrent state (False for a missing layer)."""
    return _cache_get_recurrent_state(self, layer_idx) is not None


def _wrap_cache_update(orig, name):
    @functools.wraps(orig)
    def wrapper(self, key_states, value_states, layer_idx, *args, **kwargs):
        cache_kwargs = _state_kwarg(args, kwargs)
        if cache_kwargs is not None:
            # checked before the cache grows or any layer changes
            _check_state(cache_kwargs["recurrent_state"], "cache_kwargs['recurrent_state']")
            _check_cache_kwargs(cache_kwargs, has_state=True)
            layer_idx = _check_layer_idx(layer_idx)
            layers = getattr(self, "layers", None)
            if (
                layers is not None
                and layer_idx >= len(layers)
                and getattr(self, "layer_class_to_replicate", None) is not None
                and layer_idx >= MAX_LAZY_LAYERS
            ):
                raise IndexError(
                    f"`layer_idx` must be < swaa.cache.MAX_LAZY_LAYERS = {MAX_LAZY_LAYERS} for a lazily growing "
                    f"{type(self).__name__}, got {layer_idx}"
                )
        return orig(self, key_states, value_states, layer_idx, *args, **kwargs)

    return wrapper


def _wrap_cache_crop(orig, name):
    @functools.wraps(orig)
    def wrapper(self, *args, **kwargs):
        # every layer is checked before any is cropped, so a refused crop changes nothing
        for i, layer in enumerate(getattr(self, "layers", ())):
            reason = _crop_refusal(layer)
            if reason is not None:
                raise RuntimeError(f"cannot crop the cache: layer {i}: {reason}")
        return orig(self, *args, **kwargs)

    return wrapper


_CACHE_WRAPPERS = {"update": _wrap_cache_update, "crop": _wrap_cache_crop}
_CACHE_ADDED = {
    "state_update": _cache_state_update,
    "get_recurrent_state": _cache_get_recurrent_state,
    "is_recurrent_state_initialized": _cache_is_recurrent_state_initialized,
}


# hack / unhack


def _family(roots) -> list[type]:
    seen: dict[type, None] = {}
    stack = list(roots)
    while stack:
        cls = stack.pop()
        if cls in seen:
            continue
        seen[cls] = None
        stack.extend(cls.__subclasses__())
    return list(seen)


def _set(cls: type, name: str, value) -> None:
    saved = _saved.setdefault(cls, {})
    if name in saved:
        return
    saved[name] = cls.__dict__.get(name, _MISSING)
    setattr(cls, name, value)


def _patch_family(roots, added: dict, wrappers: dict, extra_root_attrs) -> None:
    for cls in _family(roots):
        if cls in _saved:
            continue  # patched by an earlier call: a repeated hack only looks at new classes
        _saved[cls] = {}
        own = cls.__dict__
        for name, func in added.items():
            # on the roots, and on any class that defines the name itself (it would shadow the root's)
            if cls in roots or name in own:
                _set(cls, name, func)
        if cls in roots:
            for name, value in extra_root_attrs(cls).items():
                _set(cls, name, value)
        for name, make in wrappers.items():
            orig = own.get(name, _MISSING)
            if orig is _MISSING or name in _saved.get(cls, {}):
                continue
            # abstract stubs are never called; wrapping them would only blur the class
            if not callable(orig) or getattr(orig, "__isabstractmethod__", False):
                continue
            _set(cls, name, make(orig, name))


def hack_kv_cache_recurrent_state() -> None:
    """Patches every transformers cache layer class and `Cache` class to carry a recurrent state.

    Idempotent and thread-safe; calling it again also patches layer classes defined since the last call
    (about 20 us; code on a hot path checks `is_hacked()` first). See the module docstring for the API.
    """
    global _hacked
    with _lock:
        _patch_family(_LAYER_ROOTS, _LAYER_ADDED, _LAYER_WRAPPERS, _root_attrs)
        _patch_family((_cu.Cache,), _CACHE_ADDED, _CACHE_WRAPPERS, lambda cls: {})
        _hacked = True


def _root_attrs(root: type) -> dict:
    if root is _NATIVE:
        attrs = {"recurrent_state_initialized": property(_layer_is_recurrent_state_initialized)}
        for op in ("batch_repeat_interleave", "batch_select_indices"):
            if not hasattr(root, op):
                attrs[op] = _native_batch_op(op)
        return attrs
    return {"recurrent_state_initialized": False}


def unhack_kv_cache_recurrent_state() -> None:
    """Restores every patched class's `__dict__` exactly as it was before the hack.

    Does nothing when the patch is not applied. Thread-safe. States already stored stay on the layer
    objects as plain attributes, unused until the next hack.
    """
    global _hacked
    with _lock:
        for cls, names in _saved.items():
            for name, original in names.items():
                if original is _MISSING:
                    delattr(cls, name)
                else:
                    setattr(cls, name, original)
        _saved.clear()
        _hacked = False


def is_hacked() -> bool:
    """Whether the patch is applied."""
    return _hacked


# demo


def demo() -> None:
    """Prints, step by step, what the patch does to a `DynamicCache` (run by `make demo` for now)."""
    import copy

    from transformers import DynamicCache

    def show(step, cache):
        lens = [cache.layers[i].get_seq_length() for i in range(len(cache.layers))]
        states = [
            None if s is None else tuple(s.shape)
            for s in (cache.get_recurrent_state(i) for i in range(len(cache.layers)))
        ]
        print(f"{step}\n    seq lengths per layer {lens}, state shapes per layer {states}")

    was_hacked = is_hacked()
    hack_kv_cache_recurrent_state()
    try:
        torch.manual_seed(0)
        B, H, K, V, T = 2, 2, 4, 4, 6
        cache = DynamicCache()
        print(
            f"hack_kv_cache_recurrent_state(): {type(cache).__name__} gains state_update/get_recurrent_state"
        )

        state = torch.randn(B, H, K, V)
        cache.state_update(state, 0, {"num_new_tokens": T, "init_state": True})
        show(
            f"layer 0 (linear) stores a [B,H,K,V] state after {T} tokens: state_update(s, 0, "
            f"{{'num_new_tokens': {T}}})",
            cache,
        )
        print(
            f"    stored object is the one passed in: {cache.get_recurrent_state(0) is state}; "
            f"cache.get_seq_length() = {cache.get_seq_length()} (positions keep counting)"
        )

        cache.update(torch.randn(B, H, T, K), torch.randn(B, H, T, V), 1)
        show(f"layer 1 (softmax) gets {T} keys through the stock update", cache)

        beam_idx = torch.tensor([1, 0])
        cache.reorder_cache(beam_idx)
        print(
            f"reorder_cache({beam_idx.tolist()}): state rows follow the beams: "
            f"{torch.equal(cache.get_recurrent_state(0), state[beam_idx])}"
        )

        cache.batch_repeat_interleave(2)
        show("batch_repeat_interleave(2): keys and state both go to batch 4", cache)

        twin = copy.deepcopy(cache)
        print(
            f"copy.deepcopy(cache): state copied too (equal {torch.equal(twin.get_recurrent_state(0), cache.get_recurrent_state(0))}, "
            f"same object {twin.get_recurrent_state(0) is cache.get_recurrent_state(0)})"
        )

        try:
            cache.crop(-1)
        except RuntimeError as err:
            print(f"crop(-1) refused: {str(err)[:90]}...")

        try:
            cache.state_update([1.0], 0)
        except TypeError as err:
            print(f"state_update([1.0], 0) refused: {err}")

        cache.reset()
        show("reset(): states and token counts cleared (keys reset as transformers does)", cache)
    finally:
        if not was_hacked:
            unhack_kv_cache_recurrent_state()
            print(
                f"unhack_kv_cache_recurrent_state(): DynamicCache still has state_update: "
                f"{hasattr(DynamicCache, 'state_update')}"
            )
