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
  changes nothing; a tensor or a tuple of tensors becomes the layer's state and the stored state is
  returned. How it is stored depends on the layer (see "Two ways to store a state" below). ``cache_kwargs``
  entries:

  - ``"num_new_tokens": n`` (an int, or a SymInt while ``torch.compile`` traces) adds ``n`` to the number
    of positions the layer has absorbed (padding included, exactly as the key length of a softmax layer
    counts them). A layer that holds no keys answers ``get_seq_length()`` and ``get_mask_sizes()`` with
    that count, so a model whose layer 0 is linear keeps correct positions and masks.
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

Two ways to store a state:

- Dynamic layers (``DynamicLayer``, sliding, quantized, ... : everything not listed next) store the
  object passed in, as it is (no copy; it replaces the previous state), and count tokens in a Python int.
- Layers meant for compiled decode (transformers' ``StaticLayer`` family, which ``StaticCache`` is made
  of, and transformers' own linear-attention layers) keep the state in one buffer per tensor, allocated at
  the first ``state_update`` (an eager prefill) and marked with ``torch._dynamo.mark_static_address``.
  Every later ``state_update`` copies into it (nothing at all when the state passed *is* the buffer, e.g.
  an in-place kernel wrote it) and returns the buffer; a state of another shape, dtype or device gets a
  new buffer. ``reorder_cache`` and ``reset`` (which zeroes it) work in place, so ``data_ptr()`` never
  changes and a decode step allocates nothing (CUDA graphs can replay it). The token count is a 0-dim
  int64 tensor next to the state, so ``get_seq_length()`` of a state-only layer is a tensor (a copy: the
  counter itself moves in place), as it is for transformers' own ``StaticLayer``, and a ``torch.compile``'d decode step neither guards on it nor
  recompiles for a new cache. (Sliding-window static layers size their masks from a Python int, in
  transformers as here: they recompile as transformers' own sliding layers do.)
- A state-only static layer allocates no keys: ``StaticLayer`` allocates its ``max_cache_len`` key and
  value buffers at its first ``update``, which a layer that only calls ``state_update`` never makes.
  (transformers' ``early_initialization`` allocates them for every static layer it is given; it runs for
  ``generate(prefill_chunk_size=...)`` and export. Layers built from ``config.layer_types`` entries
  ``"linear_attention"``, transformers' own ``LinearAttentionLayer``, never hold keys.)
- A static layer (not a sliding one) holds at most ``max_cache_len`` positions: an ``update`` or a
  ``state_update`` that would go past it raises ValueError naming ``max_cache_len`` and changes nothing
  (transformers itself raises an IndexError from ``index_copy_`` after moving its length, or a
  device-side assert on CUDA). The check runs in eager calls only; on 5.x it costs no device sync (the
  patch keeps a Python copy of the length, read again once after compiled steps), on 4.57 it reads the
  ``cache_position`` tensor the layers of a forward share once.
- Batch size: a static layer cannot change it (transformers gives ``StaticLayer`` no
  ``batch_repeat_interleave`` / ``batch_select_indices``, its key buffers being fixed): the patch adds both
  to it as a RuntimeError that says so, and ``cache.batch_repeat_interleave`` / ``batch_select_indices``
  check every layer before touching any. Expand or select the batch before the prefill into a new
  ``StaticCache`` (``generate()`` expands its inputs before prefill). On transformers' own
  linear-attention layers (no keys) a selection keeping the batch size works in place; one that changes
  it, and ``batch_repeat_interleave(n > 1)``, put the state in a new static buffer of the new batch size
  (a compiled graph sees a new input; a new batch size recompiles anyway). ``offload`` / ``prefetch``
  move the buffer, as they move the keys.

Beyond the API:

- The state follows ``reorder_cache`` (beam search), ``batch_repeat_interleave``,
  ``batch_select_indices``, ``offload``/``prefetch`` and ``copy.deepcopy``; a tuple state is handled
  tensor by tensor. ``reset()`` clears the state and the token count.
- ``crop`` rolls a recurrent state back (speculative decoding: assisted and prompt-lookup generation crop
  the tokens a verification step rejected). ``activate_past_recording()`` (transformers 5.x has it on
  ``Cache``; the patch adds it to every layer class without one and, on 4.x, to ``Cache``, and makes 4.x
  ``generate()`` call it where 5.x does: on assisted decoding's cache and the assistant's) sets the layer
  flag ``record_past``; from then on each ``state_update`` that counts tokens keeps the state before it
  (no copy on a dynamic layer; a static layer copies its buffer aside) and the call's inputs when the
  caller hands them, ``cache_kwargs["rollback"] = (absorb, inputs)``: ``inputs`` a tuple of ``[B, n,
  ...]`` tensors (or None) holding the call's ``n = num_new_tokens`` tokens on dim 1, ``absorb(state,
  *inputs_of_the_first_m_tokens)`` the state after them (``state`` None: a zero state). The cache knows
  no kernel: the layer hands both. ``crop`` to any length since the layer's last crop, at most
  ``MAX_ROLLBACK_TOKENS`` tokens back, then gives the state of that length exactly (a call without its
  inputs only as a whole); what was kept goes at the crop (and at ``reset``, or any store not recorded).
  To no tokens (a zero state) or to all of them it always works. Anything else raises RuntimeError
  saying why and how far back the layer reaches, and ``cache.crop`` checks every layer before touching
  any, so a refused crop changes nothing. ``crop``'s argument means what transformers gives it (5.x:
  minus the tokens to remove; 4.x: the length to keep, or minus the tokens to remove). ``is_croppable``
  (5.x) is True for a layer holding a state only while it records; a static layer holding a state
  reports ``is_compileable`` False while recording (as transformers' own linear-attention layers do), so
  swaa's layers take no in-place step whose earlier state a rollback would need. transformers' own
  linear-attention layers holding a swaa state are not rolled back.
- A state whose batch size (dim 0) differs from the layer's keys or from the state it holds is refused
  (ValueError naming both sizes, nothing changed): batch operations would later drop or repeat rows.
- Bad input raises TypeError / ValueError / IndexError naming the argument and changes nothing.
- hack is idempotent (a second call also patches layer classes defined since the first one, e.g. in a
  modeling module imported later), unhack without hack does nothing, both are thread-safe, and the
  patch applies to caches created before it.

transformers >= 5.5 native linear-attention layers (``LinearAttentionCacheLayerMixin`` family, with
their ``recurrent_states`` dict): the swaa state of such a layer *is* their state slot 0, a buffer as
above (a tuple state gets one buffer per tensor). ``state_update(x)`` copies ``x`` into
``recurrent_states[0]`` and marks it initialized and ``has_previous_state[0]``; ``get_recurrent_state()``
reads slot 0 with transformers' own rule (None until ``has_previous_state[0]``), so a state written by
native code through ``update_recurrent_state`` is visible through the swaa API and the other way round
(native code writes into the same buffer when its tensor has the buffer's layout). ``reset`` zeroes the
buffer. ``cache.get_recurrent_state(i, state_idx)`` with ``state_idx`` other than 0 is answered by
transformers' own method, and ``cache.get_seq_length(i)`` of a native layer that counted tokens is that
count (transformers would refuse). While hacked, the native layers also get ``batch_repeat_interleave`` /
``batch_select_indices`` for all their states.

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

"""

from __future__ import annotations

import copy
import functools
import inspect
import numbers
import threading
import weakref

import torch
from transformers import cache_utils as _cu

__all__ = [
    "MAX_LAZY_LAYERS",
    "MAX_ROLLBACK_TOKENS",
    "hack_kv_cache_recurrent_state",
    "is_hacked",
    "token_count",
    "unhack_kv_cache_recurrent_state",
]

# A lazily growing cache creates the missing layers of a `state_update`. No model has anywhere near this
# many layers; the bound turns a wrong `layer_idx` (10**9) into an immediate IndexError instead of a loop
# that allocates millions of layer objects.
MAX_LAZY_LAYERS = 4096

# How far back `crop` can roll a recurrent state, in tokens, while the layer records the past (assisted and
# prompt-lookup decoding): transformers drafts 20 tokens by default (prompt lookup: as asked), and a
# verification step feeds the draft plus one. What a layer keeps for it costs the inputs of these tokens
# (keys, values, gates: a few kB per token and layer), plus one state per recorded call that cannot be
# recomputed; a longer call (a prefill) is first advanced to this bound, at the cost of running the linear
# kernel once more over the rest. Read at every use: raise it before generating with longer drafts.
MAX_ROLLBACK_TOKENS = 128

# instance attributes the patch keeps on a layer (native layers keep the state itself in slot 0)
_STATE = "_swaa_recurrent_state"
# absorbed tokens: a Python int on dynamic layers, a 0-dim int64 tensor (static address) on buffered ones
_COUNT = "_swaa_num_tokens"
# buffered layers: the count as a Python int for eager checks (None once compiled steps moved the tensor);
# kept live on layers whose mask formula reads a Python int (sliding windows)
_COUNT_INT = "_swaa_num_tokens_int"
# 5.x static layers: their `cumulative_length` tensor as a Python int for eager checks (None: read it again)
_KV_END = "_swaa_kv_end"
_HOME = "_swaa_state_device"
_OWNS_SLOT0 = "_swaa_owns_slot0"
# what a layer recording the past keeps so that `crop` can roll its state back (a `_Rollback`, or None)
_LOG = "_swaa_rollback"
# transformers' own flag (5.x sliding and linear-attention layers): set by `activate_past_recording`
_RECORD = "record_past"
# on a cache: recording asked for, so lazily created layers record too
_CACHE_RECORD = "_swaa_record_past"

_NATIVE = getattr(_cu, "LinearAttentionCacheLayerMixin", None)
_STATIC = _cu.StaticLayer
# layers meant for compiled decode keep their state in one static buffer
_BUFFERED = tuple(cls for cls in (_STATIC, _NATIVE) if cls is not None)
_LAYER_ROOTS = tuple(
    cls for cls in (_cu.CacheLayerMixin, _NATIVE, getattr(_cu, "DummyLayer", None)) if cls is not None
)
# the layer attribute that `Cache.max_batch_size` (4.57) or `Cache.batch_size` (5.x) reads; a state-only
# static layer never runs the key allocation that sets it
_BATCH_ATTR = (
    "max_batch_size" if isinstance(getattr(_cu.Cache, "max_batch_size", None), property) else "batch_size"
)
# Python-int token counters some layers size their masks from (sliding windows)
_INT_COUNTERS = ("cumulative_length", "cumulative_length_int")
_MISSING = object()
# what `crop(n)` means: transformers 5.x removes -n tokens (n <= 0); 4.x keeps n tokens (n >= 0) or removes
# -n (n < 0). Read from the stock method's argument name, before any patch.
_CROP_REMOVES = "tokens_to_remove" in inspect.signature(_cu.DynamicLayer.crop).parameters
# 5.x records the past (and generate() asks for it in assisted decoding); on 4.x the patch adds both
_STOCK_RECORDING = hasattr(_cu.Cache, "activate_past_recording")

_lock = threading.RLock()
_saved: dict[type, dict[str, object]] = {}  # class -> {attribute name: original value or _MISSING}
_hacked = False
# per-thread reentrancy bookkeeping: a subclass method that calls super() must not move the state twice
_tls = threading.local()
# 4.57 static layers write where `cache_position` says: the end of the last positions tensor checked, so the
# layers of one forward (which share that tensor) read it from the device once
_positions_seen = (None, None, 0)  # (weakref to the tensor, its version, max + 1)


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


def _compiling() -> bool:
    return torch.compiler.is_compiling()


def _in_raw(layer) -> bool:
    """Whether a batch method of this layer is running its stock code (which must see the KV length only).
    Batch methods never run inside a compiled graph, so a compiled call is never inside one."""
    return not _compiling() and id(layer) in _raw_depth()


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
        # a SymInt: a sequence length while torch.compile traces with dynamic shapes
        if isinstance(n, bool) or not isinstance(n, (numbers.Integral, torch.SymInt)):
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
    if "rollback" in cache_kwargs:
        _check_rollback(cache_kwargs["rollback"], cache_kwargs.get("num_new_tokens"))


def _check_rollback(rollback, n) -> None:
    """`cache_kwargs['rollback']`: `(absorb, inputs)`, `inputs` a tuple of `[B, n, ...]` tensors (or None)."""
    name = "cache_kwargs['rollback']"
    if not isinstance(rollback, tuple) or len(rollback) != 2:
        raise TypeError(f"`{name}` must be a tuple (absorb, inputs), got {type(rollback).__name__}")
    absorb, inputs = rollback
    if not callable(absorb):
        raise TypeError(f"`{name}[0]` (absorb) must be callable, got {type(absorb).__name__}")
    if not isinstance(inputs, tuple) or not any(isinstance(x, torch.Tensor) for x in inputs):
        raise TypeError(
            f"`{name}[1]` (inputs) must be a tuple of tensors (or None), got {type(inputs).__name__}"
        )
    if isinstance(n, torch.SymInt):
        return  # traced: shapes are symbolic too
    if n is None:
        raise ValueError(
            f"`{name}` needs `cache_kwargs['num_new_tokens']`: the number of tokens its inputs hold"
        )
    for i, x in enumerate(inputs):
        if x is None:
            continue
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"`{name}[1][{i}]` must be a tensor or None, got {type(x).__name__}")
        if x.dim() < 2 or x.shape[1] != n:
            raise ValueError(
                f"`{name}[1][{i}]` must be [B, num_new_tokens={n}, ...] (tokens on dim 1), got shape {tuple(x.shape)}"
            )


def _check_state_batch(layer, state, keys=None) -> None:
    """Refuses a state whose batch size (dim 0) differs from the layer's keys (or the `keys` being stored
    with it) or from its previous state: batch operations would later drop or duplicate rows silently."""
    first = _tensors(state)[0]
    if first.dim() == 0:
        return
    batch = first.shape[0]
    if not isinstance(keys, torch.Tensor):
        keys = getattr(layer, "keys", None)
    if isinstance(keys, torch.Tensor) and keys.dim() >= 3 and keys.shape[0] != batch:
        raise ValueError(
            f"`recurrent_state` has batch size {batch}, but the keys of this {type(layer).__name__} have batch "
            f"size {keys.shape[0]}: a layer's state and keys hold the same sequences; nothing was changed"
        )
    previous = _read(layer)
    if previous is not None:
        before = _tensors(previous)[0]
        if before.dim() > 0 and before.shape[0] != batch:
            raise ValueError(
                f"`recurrent_state` has batch size {batch}, but the state this {type(layer).__name__} holds has "
                f"batch size {before.shape[0]}: change the batch with the cache's batch operations (or reset it "
                "first); nothing was changed"
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


# capacity of static layers (eager calls only: a compiled graph cannot raise without a device sync)


def _is_bounded(layer) -> bool:
    """A static layer whose positions cannot go past `max_cache_len` (sliding windows roll instead)."""
    return isinstance(layer, _STATIC) and not getattr(layer, "is_sliding", False)


def _full_message(layer, new: int, held: int, what: str) -> str:
    return (
        f"cannot add {new} {what} {type(layer).__name__}: it holds {held} of its max_cache_len="
        f"{layer.max_cache_len} positions, and a static cache cannot grow. Build the cache with a "
        "max_cache_len of at least the prompt plus the new tokens, or reset() it; nothing was changed"
    )


def _count_int(layer) -> int:
    """The token count of a buffered layer as a Python int (read from the device after compiled steps)."""
    value = getattr(layer, _COUNT_INT, None)
    if value is None:
        value = int(getattr(layer, _COUNT))
        setattr(layer, _COUNT_INT, value)
    return value


def _check_state_room(layer, cache_kwargs) -> None:
    if not cache_kwargs or _compiling() or not _is_bounded(layer):
        return
    n = cache_kwargs.get("num_new_tokens")
    if not n:
        return
    held = _count_int(layer) if isinstance(getattr(layer, _COUNT, None), torch.Tensor) else 0
    if held + n > layer.max_cache_len:
        raise ValueError(_full_message(layer, n, held, "tokens to the recurrent state of"))


def _positions_end(positions: torch.Tensor) -> int:
    global _positions_seen
    ref, version, end = _positions_seen
    try:
        now = positions._version
    except RuntimeError:  # an inference tensor has no version counter: read it every time
        now = None
    if now is not None and ref is not None and ref() is positions and version == now:
        return end
    end = int(positions.max()) + 1 if positions.numel() else 0
    if now is not None:
        _positions_seen = (weakref.ref(positions), now, end)
    return end


def _check_kv_room(layer, key_states, args, kwargs):
    """Raises before a bounded static layer writes past `max_cache_len`; returns the new end of its keys on
    5.x (kept as `_KV_END`), None on 4.57."""
    if not isinstance(key_states, torch.Tensor) or key_states.dim() < 3:
        return None
    new = key_states.shape[-2]
    length = getattr(layer, "cumulative_length", None)
    if isinstance(length, torch.Tensor):  # 5.x: written at cumulative_length + arange(new)
        start = getattr(layer, _KV_END, None)
        if start is None:
            start = int(length)
        if start + new > layer.max_cache_len:
            raise ValueError(_full_message(layer, new, start, "tokens to"))
        return start + new
    # 4.57: written where `cache_position` says (positions 0 .. new - 1 without one)
    cache_kwargs = args[0] if args else kwargs.get("cache_kwargs")
    positions = cache_kwargs.get("cache_position") if isinstance(cache_kwargs, dict) else None
    end = _positions_end(positions) if isinstance(positions, torch.Tensor) else new
    if end > layer.max_cache_len:
        raise ValueError(_full_message(layer, new, max(end - new, 0), "tokens to"))
    return None


# where a layer keeps its state: the one place that knows plain layers from native linear-attention ones,
# and buffered (static) layers from dynamic ones


def _is_native(layer) -> bool:
    return _NATIVE is not None and isinstance(layer, _NATIVE)


def _is_buffered(layer) -> bool:
    return isinstance(layer, _BUFFERED)


def _tensors(state) -> tuple:
    return state if isinstance(state, tuple) else (state,)


def _same_layout(a, b) -> bool:
    if isinstance(a, tuple) != isinstance(b, tuple):
        return False
    ta, tb = _tensors(a), _tensors(b)
    if len(ta) != len(tb):
        return False
    for x, y in zip(ta, tb):
        if (
            not isinstance(x, torch.Tensor)
            or x.shape != y.shape
            or x.dtype != y.dtype
            or x.device != y.device
        ):
            return False
    return True


def _mark_static(t: torch.Tensor) -> torch.Tensor:
    # not while dynamo traces (as transformers does): a buffer is meant to be allocated in eager prefill
    if not _compiling():
        torch._dynamo.mark_static_address(t)
    return t


def _new_buffer(src: torch.Tensor) -> torch.Tensor:
    """A static buffer holding a copy of `src` (never `src` itself: the caller keeps its tensor)."""
    return _mark_static(src.clone(memory_format=torch.contiguous_format))


def _read(layer):
    """The state the layer holds, or None."""
    if _is_native(layer):
        # transformers' own rule: a slot is meaningful once `has_previous_state` says so
        if layer.has_previous_state.get(0) and layer.is_recurrent_states_initialized.get(0):
            return layer.recurrent_states.get(0)
        return None
    state = getattr(layer, _STATE, None)
    if state is None or not getattr(layer, "recurrent_state_initialized", False):
        return None  # (a buffered layer keeps its zeroed buffer after `reset`)
    return state


def _owned(layer):
    """What the patch must move in batch operations (a buffer even while it holds no state), or None."""
    if _is_native(layer):
        return layer.recurrent_states.get(0) if getattr(layer, _OWNS_SLOT0, False) else None
    return getattr(layer, _STATE, None)


def _place(layer, state) -> None:
    """Puts `state` where the layer keeps it, without saying whether it holds a state."""
    if _is_native(layer):
        layer.recurrent_states[0] = state
        layer.is_recurrent_states_initialized[0] = True
        setattr(layer, _OWNS_SLOT0, True)
    else:
        setattr(layer, _STATE, state)


def _set_holds_state(layer, holds: bool) -> None:
    # written only when it changes: a compiled step would otherwise replay the store on every call (dynamo
    # emits each attribute write after the graph; the value it read is guarded already)
    if _is_native(layer):
        if (holds or 0 in layer.has_previous_state) and layer.has_previous_state.get(0) is not holds:
            layer.has_previous_state[0] = holds
    elif getattr(layer, "recurrent_state_initialized", None) is not holds:
        layer.recurrent_state_initialized = holds


def _detach_native_slot(layer) -> None:
    """Empties a native slot 0 that holds a swaa state, so transformers' code never touches it."""
    layer.recurrent_states[0] = None
    layer.is_recurrent_states_initialized[0] = False
    layer.__dict__.pop(_OWNS_SLOT0, None)


def _drop(layer) -> None:
    """Clears the state; a buffered layer keeps its buffer for the next one."""
    _set_holds_state(layer, False)
    if not _is_buffered(layer):
        layer.__dict__.pop(_STATE, None)
        layer.__dict__.pop(_HOME, None)


def _write_buffer(layer, state):
    """Copies `state` into the layer's buffer (allocated here the first time, or for a new layout)."""
    if _is_native(layer):
        current = layer.recurrent_states.get(0) if layer.is_recurrent_states_initialized.get(0) else None
    else:
        current = getattr(layer, _STATE, None)
    if current is not None and _same_layout(current, state):
        for dst, src in zip(_tensors(current), _tensors(state)):
            if dst is not src:  # an in-place kernel may have written the buffer itself
                dst.copy_(src)
        buffer = current
    else:
        buffer = tuple(_new_buffer(t) for t in state) if isinstance(state, tuple) else _new_buffer(state)
        first = _tensors(buffer)[0]
        setattr(layer, _HOME, first.device)
        if isinstance(layer, _STATIC) and not layer.is_initialized and first.dim() > 0:
            setattr(layer, _BATCH_ATTR, first.shape[0])
        count = getattr(layer, _COUNT, None)
        if not isinstance(count, torch.Tensor) or count.device != first.device:
            # allocated with the first buffer, in eager prefill, so that it is a static address too
            start = 0 if count is None else count
            setattr(
                layer, _COUNT, _mark_static(torch.as_tensor(start, dtype=torch.int64, device=first.device))
            )
            if not _compiling():
                setattr(layer, _COUNT_INT, int(start))
    if buffer is not current or _is_native(layer):  # the same buffer stays where it is (no store to replay)
        _place(layer, buffer)
    return buffer


def _count_tokens(layer, n) -> None:
    count = getattr(layer, _COUNT, None)
    if isinstance(count, torch.Tensor):
        if isinstance(n, int) and n == 0:
            return
        count.add_(n)
        if any(_is_int(getattr(layer, name, None)) for name in _INT_COUNTERS):
            # its masks are sized from a Python int, as transformers' own sliding layers are
            setattr(layer, _COUNT_INT, _count_int(layer) + n)
        elif _compiling():
            setattr(layer, _COUNT_INT, None)  # read from the device at the next eager check
        else:
            setattr(layer, _COUNT_INT, _count_int(layer) + int(n))
    elif n:
        layer.__dict__[_COUNT] = (count or 0) + int(n)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _store(layer, state, cache_kwargs):
    """Stores `state` (as it is, or copied into the layer's buffer) and returns what is stored."""
    # before the store: a buffered layer's previous state is about to be overwritten
    log = _next_log(layer, state, cache_kwargs)
    if log is not None or getattr(layer, _LOG, None) is not None:
        setattr(layer, _LOG, log)
    if _is_buffered(layer):
        state = _write_buffer(layer, state)
    else:
        _place(layer, state)
        # where the state lives, so `prefetch` can bring it back after `offload`
        layer.__dict__[_HOME] = _tensors(state)[0].device
    _set_holds_state(layer, True)
    if cache_kwargs:
        if cache_kwargs.get("init_state"):
            first = _tensors(state)[0]
            layer.recurrent_dtype = first.dtype
            layer.recurrent_device = first.device
        n = cache_kwargs.get("num_new_tokens")
        if n is not None:
            _count_tokens(layer, n)
    return state


def _map_state(state, fn):
    if isinstance(state, tuple):
        moved = tuple(fn(t) for t in state)
        # in place on every tensor: the same tuple object, as for a single buffer
        return state if all(a is b for a, b in zip(moved, state)) else moved
    return fn(state)


# rolling a state back (speculative decoding): while a layer records the past, each `state_update` that
# counts tokens keeps what `crop` needs to return to any length since the last crop: the state before the
# call (reused from the stored state: no copy on a dynamic layer) and, when the caller hands them, the
# call's inputs and a function that absorbs them into a state. Calls whose inputs are kept join into one
# segment (its later states can be recomputed), so a draft of n tokens costs n tokens of inputs, not n
# states. Memory goes at the next crop, reset, or any store that is not recorded.


class _Segment:
    """Tokens `[pos, pos + n)` of a layer: the state at `pos` and, if kept, what recomputes the rest."""

    __slots__ = ("pos", "state", "chunks", "absorb", "n")

    def __init__(self, pos, state, chunks, absorb, n):
        self.pos, self.state, self.chunks, self.absorb, self.n = pos, state, chunks, absorb, n

    def __deepcopy__(self, memo):
        # the tensors are copied; `absorb` is not (a layer's bound method would copy the layer's weights)
        state, chunks = copy.deepcopy((self.state, self.chunks), memo)
        return _Segment(self.pos, state, chunks, self.absorb, self.n)

    def inputs(self, stop=None) -> tuple:
        """The kept inputs of tokens `[pos, pos + stop)`, each `[B, stop, ...]` (None stays None)."""
        joined = tuple(
            None if parts[0] is None else (parts[0] if len(parts) == 1 else torch.cat(parts, dim=1))
            for parts in zip(*self.chunks)
        )
        return joined if stop is None else tuple(None if x is None else x[:, :stop] for x in joined)


class _Rollback:
    """The segments a layer kept since its last crop, ending at its token count `end`."""

    __slots__ = ("segments", "end")

    def __init__(self, segments, end):
        self.segments, self.end = segments, end

    @property
    def floor(self) -> int:
        return self.segments[0].pos

    def reaches(self, target: int) -> bool:
        if target == self.end:
            return True
        for seg in self.segments:
            if target == seg.pos or (seg.chunks is not None and seg.pos < target < seg.pos + seg.n):
                return True
        return False

    def state_at(self, target: int):
        for seg in self.segments:
            if target == seg.pos:
                return seg.state
            if seg.pos < target < seg.pos + seg.n:
                return seg.absorb(seg.state, *seg.inputs(target - seg.pos))
        raise AssertionError(f"no segment reaches {target}")  # callers ask `reaches` first


def _count_value(layer) -> int:
    """The layer's token count as a Python int (eager calls only)."""
    count = getattr(layer, _COUNT, None)
    if isinstance(count, torch.Tensor):
        return _count_int(layer)
    return count or 0


def _recording(layer) -> bool:
    return getattr(layer, _RECORD, False) is True


def _next_log(layer, state, cache_kwargs):
    """What the layer keeps for a rollback once `state` is stored, or None (nothing earlier can be reached)."""
    if _compiling() or not _recording(layer) or _is_native(layer) or not cache_kwargs:
        return None
    n = cache_kwargs.get("num_new_tokens")
    if not n:
        return None  # a state replaced without tokens: it cannot be placed among earlier ones
    start = _count_value(layer)
    log = getattr(layer, _LOG, None)
    segments = list(log.segments) if log is not None and log.end == start else []
    absorb, inputs = cache_kwargs.get("rollback") or (None, None)
    last = segments[-1] if segments else None
    if inputs is not None and last is not None and last.chunks is not None and last.pos + last.n == start:
        # the state before this call can be recomputed from the previous segment: extend it instead
        segments[-1] = _Segment(last.pos, last.state, [*last.chunks, inputs], absorb, last.n + n)
    else:
        before = _read(layer)
        if before is not None and _is_buffered(layer):
            if any(a is b for a in _tensors(state) for b in _tensors(before)):
                return None  # written in place by the caller: the earlier state is gone
            before = _map_state(before, lambda t: t.clone())  # the buffer is about to be overwritten
        segments.append(_Segment(start, before, None if inputs is None else [inputs], absorb, n))
    return _Rollback(_bounded(segments, start + n), start + n)


def _bounded(segments: list, end: int) -> list:
    """Drops (or advances) the oldest segments so that about `MAX_ROLLBACK_TOKENS` tokens stay reachable."""
    floor = end - MAX_ROLLBACK_TOKENS
    while len(segments) > 1 and segments[1].pos <= floor:
        segments.pop(0)
    first = segments[0]
    if first.pos < floor and first.chunks is not None:
        cut = floor - first.pos
        inputs = first.inputs()
        state = first.absorb(first.state, *(None if x is None else x[:, :cut] for x in inputs))
        rest = tuple(None if x is None else x[:, cut:].clone() for x in inputs)  # the cut part's memory goes
        segments[0] = _Segment(floor, state, [rest], first.absorb, first.n - cut)
    return segments


def _map_log(layer, fn) -> None:
    """Applies a batch operation to what the layer kept for a rollback (tensors with the batch on dim 0)."""
    log = getattr(layer, _LOG, None)
    if log is None:
        return

    def move(x):
        if x is None:
            return None
        return _map_state(x, fn) if isinstance(x, (torch.Tensor, tuple)) else x

    segments = [
        _Segment(
            s.pos,
            move(s.state),
            None if s.chunks is None else [tuple(move(x) for x in chunk) for chunk in s.chunks],
            s.absorb,
            s.n,
        )
        for s in log.segments
    ]
    setattr(layer, _LOG, _Rollback(segments, log.end))


# methods added to every layer class


def _layer_state_update(self, recurrent_state, cache_kwargs=None):
    """Stores (or, with None, reads) this layer's recurrent state.

    Args:
        recurrent_state (`torch.Tensor` or tuple of tensors or None):
            The new state, e.g. `[B, H, K, V]` or `(kv_state [B, H, K, V], z_state [B, H, K])`; it replaces the
            previous one. A dynamic layer stores the object itself (no copy); a static or native linear-attention
            layer copies it into its static buffer (one per tensor). None returns the current state and changes
            nothing.
        cache_kwargs (`dict`, *optional*):
            `"num_new_tokens": n` (int, or SymInt under torch.compile) adds `n` absorbed positions to the layer's
            count; `"init_state": True` records `recurrent_dtype` and `recurrent_device`. Other keys are ignored.
            Default: `None`.

    Returns:
        The stored state: the object passed in, or the layer's buffer (None when reading an empty layer).
    """
    if recurrent_state is None:
        _check_cache_kwargs(cache_kwargs, has_state=False)
        return _read(self)
    _check_state(recurrent_state)
    _check_cache_kwargs(cache_kwargs, has_state=True)
    _check_state_batch(self, recurrent_state)
    _check_state_room(self, cache_kwargs)
    return _store(self, recurrent_state, cache_kwargs)


def _layer_get_recurrent_state(self):
    """Returns this layer's recurrent state, or None."""
    return _read(self)


def _layer_set_recurrent_state(self, state):
    """Stores `state` as this layer's recurrent state, as `state_update` does (no token count); None clears
    it (the token count stays). Returns what is stored."""
    if state is None:
        _drop(self)
        return None
    _check_state(state, "state")
    _check_state_batch(self, state)
    return _store(self, state, None)


def _layer_is_recurrent_state_initialized(self) -> bool:
    """Whether this layer holds a recurrent state."""
    return _read(self) is not None


# batch operations that change the batch size cannot keep a static layer's buffers
_RESIZE_OPS = ("batch_repeat_interleave", "batch_select_indices")


def _resize_refusal(layer, op_name: str) -> str:
    return (
        f"{type(layer).__name__} cannot {op_name}: a static cache layer keeps its keys, values and recurrent "
        "state in buffers allocated once, at fixed addresses, for compiled decode, and cannot change its batch "
        "size. Expand or select the batch before the prefill that fills a new StaticCache (generate() expands "
        "its inputs before prefill), or use a DynamicCache; reorder_cache (beam search) works in place"
    )


def _static_resize_op(op_name):
    def method(self, *args, **kwargs):
        raise RuntimeError(_resize_refusal(self, op_name))

    method.__name__ = op_name
    method.__qualname__ = f"{_STATIC.__name__}.{op_name}"
    method.__doc__ = f"Refuses `{op_name}` with a clear message (added by swaa; transformers has none here)."
    return method


def _native_batch_op(op_name):
    def method(self, arg):
        if isinstance(self, _STATIC):  # a hybrid with static keys: refuse before any state moves
            raise RuntimeError(_resize_refusal(self, op_name))
        fn = _BUFFER_FNS[op_name](self, arg)
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
        f"`{op_name}` for every conv and recurrent state of a linear-attention layer (added by swaa): in "
        "place while the batch size stays, into a new static buffer when it changes."
    )
    # wrapped like the stock methods, so a swaa state in slot 0 is moved once, by the wrapper
    return _wrap_batch(method, op_name)


def _to_device_of(t, idx):
    return idx.to(t.device) if isinstance(idx, torch.Tensor) else idx


# batch operations on a state stored as it is: each returns a new tensor


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


# the same on a buffer: in place (same data_ptr) where the shape stays, a new static buffer where it cannot


def _reorder_in_place(layer, beam_idx):
    def fn(t):
        t.copy_(t.index_select(0, beam_idx.to(t.device)))
        return t

    return fn


def _select_in_place(layer, indices):
    def fn(t):
        picked = t[_to_device_of(t, indices), ...]
        if picked.shape == t.shape:
            t.copy_(picked)
            return t
        return _mark_static(picked.contiguous())

    return fn


def _repeat_buffer(layer, repeats):
    def fn(t):
        if repeats == 1:
            return t
        return _mark_static(t.repeat_interleave(repeats, dim=0))

    return fn


def _prefetch_buffer(layer, _):
    move = _prefetch_fn(layer, _)

    def fn(t):
        moved = move(t)
        return t if moved is t else _mark_static(moved)

    return fn


_BUFFER_FNS = {
    "reorder_cache": _reorder_in_place,
    "batch_repeat_interleave": _repeat_buffer,
    "batch_select_indices": _select_in_place,
    "offload": _offload_fn,
    "prefetch": _prefetch_buffer,
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
                    _place(self, state)
                raise
            if state is not None:
                fns = _BUFFER_FNS if _is_buffered(self) else _BATCH_FNS
                _place(self, _map_state(state, fns[name](self, arg)))
            _map_log(self, _BATCH_FNS[name](self, arg))  # never buffers: new tensors
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
            state = _owned(self)
            native = state is not None and _is_native(self)
            # transformers' native reset zeroes slot 0 itself, which fails on a tuple: the patch does it
            if native:
                _detach_native_slot(self)
            try:
                out = orig(self, *args, **kwargs)
            finally:
                if native:
                    _place(self, state)
            if _is_buffered(self):
                # zeroed in place: the buffers keep their addresses for the next prefill
                for t in _tensors(state) if state is not None else ():
                    t.zero_()
                _set_holds_state(self, False)
                count = getattr(self, _COUNT, None)
                if isinstance(count, torch.Tensor):
                    count.zero_()
                    setattr(self, _COUNT_INT, 0)
                if isinstance(self, _STATIC):
                    setattr(self, _KV_END, None)
            else:
                _drop(self)
                self.__dict__.pop(_COUNT, None)
            self.__dict__.pop(_LOG, None)
        finally:
            guards.discard(key)
        return out

    return wrapper


def _crop_target(layer, args, kwargs):
    """`(target, reason)`: the token count `crop(*args, **kwargs)` leaves this layer with, and why its state
    cannot be rolled back there (None when it can); `(None, None)` for a layer that holds no state, which
    transformers' own `crop` handles. Bad arguments raise TypeError / ValueError. Changes nothing."""
    count = _count_value(layer)
    if _read(layer) is None and not count:
        return None, None
    values = [*args, *kwargs.values()]
    if len(values) != 1:
        raise TypeError(f"`crop` takes one argument, got {len(values)}")
    arg = values[0]
    if (
        isinstance(arg, torch.Tensor)
        and arg.numel() == 1
        and not arg.is_floating_point()
        and arg.dtype != torch.bool
    ):
        arg = int(arg)  # a static cache's length is a tensor: generate() crops by differences of them
    if isinstance(arg, bool) or not isinstance(arg, numbers.Integral):
        raise TypeError(f"`crop`'s argument must be an int, got {type(arg).__name__} ({arg!r})")
    arg = int(arg)
    if _CROP_REMOVES:
        if arg > 0:
            raise ValueError(
                f"`tokens_to_remove` must be <= 0 (minus the number of tokens to remove), got {arg}"
            )
        target = count + arg
    else:  # 4.x: a length to keep, or minus the number of tokens to remove
        target = count + arg if arg < 0 else min(arg, count)
    target = max(target, 0)
    held = f"{type(layer).__name__} holds a recurrent state ({count} absorbed tokens), which cannot be rolled back"
    if _is_native(layer):
        return target, f"{held}: swaa rolls back no state of transformers' own linear-attention layers"
    if target in (0, count):
        return target, None  # no tokens (no state), or nothing to undo
    log = getattr(layer, _LOG, None)
    if log is not None and log.end == count and log.reaches(target):
        return target, None
    limit = f"swaa.cache.MAX_ROLLBACK_TOKENS = {MAX_ROLLBACK_TOKENS}"
    if not _recording(layer):
        why = (
            "a layer keeps what a rollback needs only while it records the past: call "
            "`cache.activate_past_recording()` before the forward whose tokens may be cropped (generate() does "
            f"for assisted and prompt-lookup decoding); it then reaches back to its last crop, at most {limit} "
            "tokens"
        )
    elif log is None or log.end != count:
        why = (
            "nothing it can roll back to was recorded since its last crop (a state stored without its tokens, "
            "or written in place)"
        )
    else:
        why = f"it reaches back only to {log.floor} tokens (its last crop, at most {limit} tokens back)"
    return target, (
        f"{held} to {target} tokens: {why}. Rebuild the cache (or `reset` it and run the prefix again) "
        "instead; nothing was changed"
    )


def _set_rolled_back(layer, target: int, state) -> None:
    """The layer after a crop to `target` tokens: `state` (`_MISSING`: the one it holds; None: none)."""
    if state is None:
        if _is_buffered(layer):
            for t in _tensors(_owned(layer)) if _owned(layer) is not None else ():
                t.zero_()  # in place, as `reset`: the buffer keeps its address
        _drop(layer)
    elif state is not _MISSING:
        if _is_buffered(layer):
            _write_buffer(layer, state)
        else:
            _place(layer, state)
            layer.__dict__[_HOME] = _tensors(state)[0].device
        _set_holds_state(layer, True)
    count = getattr(layer, _COUNT, None)
    if isinstance(count, torch.Tensor):
        count.fill_(target)
        setattr(layer, _COUNT_INT, target)
    elif target:
        layer.__dict__[_COUNT] = target
    else:
        layer.__dict__.pop(_COUNT, None)
    layer.__dict__.pop(_LOG, None)


def _wrap_crop(orig, name):
    @functools.wraps(orig)
    def wrapper(self, *args, **kwargs):
        guards = _guards()
        key = (id(self), name)
        if key in guards:  # a subclass's crop calling super(): the outer call rolls the state back
            return orig(self, *args, **kwargs)
        target, reason = _crop_target(self, args, kwargs)
        if reason is not None:
            raise RuntimeError(f"cannot crop: {reason}")
        if target is None:
            try:
                return orig(self, *args, **kwargs)
            finally:
                if isinstance(self, _STATIC):
                    setattr(self, _KV_END, None)  # crop moved `cumulative_length`
        count = _count_value(self)
        if target == count:
            state = _MISSING
        elif target == 0:
            state = None
        else:
            state = getattr(self, _LOG).state_at(target)  # computed before anything changes
        out = None
        if getattr(self, "is_initialized", False):
            # keys too (a layer with both): transformers crops them, seeing the KV length only
            guards.add(key)
            depth = _raw_depth()
            depth[id(self)] = depth.get(id(self), 0) + 1
            try:
                out = orig(self, *args, **kwargs)
            finally:
                guards.discard(key)
                depth[id(self)] -= 1
                if not depth[id(self)]:
                    del depth[id(self)]
                if isinstance(self, _STATIC):
                    setattr(self, _KV_END, None)
        _set_rolled_back(self, target, state)
        return out

    return wrapper


def _wrap_update(orig, name):
    @functools.wraps(orig)
    def wrapper(self, key_states, value_states, *args, **kwargs):
        cache_kwargs = _state_kwarg(args, kwargs)
        bounded = _is_bounded(self)
        if cache_kwargs is None and not bounded:
            return orig(self, key_states, value_states, *args, **kwargs)
        if _compiling():
            # no reentrancy bookkeeping in a graph (thread-local sets keyed by id() would guard on the layer)
            if bounded:
                setattr(self, _KV_END, None)  # the compiled step moves `cumulative_length`
            out = orig(self, key_states, value_states, *args, **kwargs)
            if cache_kwargs is not None:
                state = cache_kwargs["recurrent_state"]
                _check_state(state, "cache_kwargs['recurrent_state']")
                _check_cache_kwargs(cache_kwargs, has_state=True)
                _check_state_batch(self, state)
                _store(self, state, cache_kwargs)
            return out
        guards = _guards()
        key = (id(self), name)
        if key in guards:
            return orig(self, key_states, value_states, *args, **kwargs)
        if cache_kwargs is not None:
            state = cache_kwargs["recurrent_state"]
            _check_state(state, "cache_kwargs['recurrent_state']")
            _check_cache_kwargs(cache_kwargs, has_state=True)
            _check_state_batch(self, state, key_states)
            _check_state_room(self, cache_kwargs)
        kv_end = _check_kv_room(self, key_states, args, kwargs) if bounded else None
        guards.add(key)
        try:
            out = orig(self, key_states, value_states, *args, **kwargs)
        finally:
            guards.discard(key)
        if kv_end is not None:
            setattr(self, _KV_END, kv_end)
        if cache_kwargs is not None:
            _store(self, state, cache_kwargs)
        return out

    return wrapper


def _wrap_update_recurrent_state(orig, name):
    @functools.wraps(orig)
    def wrapper(self, recurrent_states, *args, **kwargs):
        state_idx = kwargs.get("state_idx", args[0] if args else 0)
        if state_idx == 0 and getattr(self, _OWNS_SLOT0, False):
            # transformers copies into the slot in place: fine for a swaa buffer of the same layout; a tuple or
            # another layout makes it allocate a buffer of its own
            if not _same_layout(self.recurrent_states.get(0), recurrent_states):
                _detach_native_slot(self)
        return orig(self, recurrent_states, *args, **kwargs)

    return wrapper


def _wrap_get_seq_length(orig, name):
    @functools.wraps(orig)
    def wrapper(self, *args, **kwargs):
        n = orig(self, *args, **kwargs)
        count = getattr(self, _COUNT, None)
        if count is None or _in_raw(self):
            return n
        if isinstance(count, torch.Tensor):
            # no Python branch on a device value: a compiled step neither syncs nor guards on it. A copy, not the
            # counter itself, which the next `state_update` moves in place
            if isinstance(n, torch.Tensor):
                return torch.where(n > 0, n, count.to(n.device))
            return n if n else count.clone()
        if count and n == 0:
            return count
        return n

    return wrapper


def _wrap_get_mask_sizes(orig, name):
    @functools.wraps(orig)
    def wrapper(self, *args, **kwargs):
        # only layers whose mask formula reads a Python-int token counter (sliding windows) need the count:
        # while they hold no keys they answer as if they had absorbed `count` tokens; the others read
        # `get_seq_length` (which already reports the count) or a fixed `max_cache_len`
        names = [n for n in _INT_COUNTERS if _is_int(getattr(self, n, None))]
        if not names or _in_raw(self):
            return orig(self, *args, **kwargs)
        count = getattr(self, _COUNT, None)
        if isinstance(count, torch.Tensor):
            count = getattr(self, _COUNT_INT, None)
        if not count or any(getattr(self, n) for n in names):
            return orig(self, *args, **kwargs)
        saved = {n: getattr(self, n) for n in names}
        try:
            for n in names:
                setattr(self, n, count)
            return orig(self, *args, **kwargs)
        finally:
            for n, value in saved.items():
                setattr(self, n, value)

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


def _layer_activate_past_recording(self):
    """Keeps, from now on, what `crop` needs to roll this layer's recurrent state back (added by swaa where
    transformers has no such method; its 5.x sliding and linear-attention layers set the same flag)."""
    self.record_past = True


def _class_value(orig, layer):
    return orig.__get__(layer, type(layer)) if isinstance(orig, property) else orig


def _croppable_property(orig, cls):
    def is_croppable(self) -> bool:
        value = _class_value(orig, self)
        if not value or _is_native(self) or (_read(self) is None and not _count_value(self)):
            return value
        return _recording(self)  # a held state rolls back while the layer records the past

    is_croppable.__doc__ = (
        "Whether `crop` can put this layer back as it was (swaa: a held state, while recording)."
    )
    return property(is_croppable)


def _compileable_property(orig, cls):
    if not issubclass(cls, _STATIC) or (_NATIVE is not None and issubclass(cls, _NATIVE)):
        return None

    plain = not isinstance(orig, property)

    def is_compileable(self) -> bool:
        # while recording the past, a layer holding a state takes no in-place step (the state before it is
        # what a rollback starts from), as transformers' own linear-attention layers compile no step then.
        # One frame, no helper calls: dynamo's guards evaluate this for every layer at every compiled call
        value = orig if plain else orig.__get__(self, type(self))
        if not value:
            return value
        if getattr(self, _RECORD, False) is not True:
            return True
        return _read(self) is None

    is_compileable.__doc__ = (
        "Whether the layer suits compiled decode (swaa: not while a held state records the past)."
    )
    return property(is_compileable)


_LAYER_PROPERTIES = {"is_croppable": _croppable_property, "is_compileable": _compileable_property}


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
    layer = self.layers[layer_idx]
    if (
        getattr(self, _CACHE_RECORD, False)
        and not _recording(layer)
        and hasattr(layer, "activate_past_recording")
    ):
        layer.activate_past_recording()  # created after the cache was asked to record
    return layer.state_update(recurrent_state, cache_kwargs)


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
            reason = _crop_target(layer, args, kwargs)[1]
            if reason is not None:
                raise RuntimeError(f"cannot crop the cache: layer {i}: {reason}")
        return orig(self, *args, **kwargs)

    return wrapper


def _wrap_cache_get_seq_length(orig, name):
    @functools.wraps(orig)
    def wrapper(self, layer_idx=0, *args, **kwargs):
        # transformers refuses `get_seq_length(i)` for a native linear-attention layer (it tracks no length),
        # which is what a swaa layer asks for its mask offset: one that counted tokens answers with its count
        layers = getattr(self, "layers", None)
        if isinstance(layers, list) and _is_int(layer_idx) and 0 <= layer_idx < len(layers):
            layer = layers[layer_idx]
            if _is_native(layer) and not isinstance(layer, _cu.CacheLayerMixin):
                count = getattr(layer, _COUNT, None)
                if count is not None:
                    return count.clone() if isinstance(count, torch.Tensor) else count
        return orig(self, layer_idx, *args, **kwargs)

    return wrapper


def _wrap_cache_resize(orig, name):
    @functools.wraps(orig)
    def wrapper(self, *args, **kwargs):
        # every layer is checked before any changes, so a refused call changes nothing
        for i, layer in enumerate(getattr(self, "layers", ())):
            if isinstance(layer, _STATIC):
                raise RuntimeError(f"cannot {name} the cache: layer {i}: {_resize_refusal(layer, name)}")
        return orig(self, *args, **kwargs)

    return wrapper


def _cache_activate_past_recording(self):
    """Every layer keeps, from now on, what `crop` needs to roll it back (its recurrent state too); layers a
    lazily growing cache creates later record as well. (Added by swaa on transformers 4.x, which has none.)"""
    target = _cache_layers_for(self)
    for cache in {id(self): self, id(target): target}.values():
        cache.__dict__[_CACHE_RECORD] = True
    for layer in getattr(target, "layers", ()):
        if hasattr(layer, "activate_past_recording"):
            layer.activate_past_recording()


def _wrap_cache_activate(orig, name):
    @functools.wraps(orig)
    def wrapper(self, *args, **kwargs):
        out = orig(self, *args, **kwargs)
        # layers that a lazily growing cache creates later record too
        self.__dict__[_CACHE_RECORD] = True
        return out

    return wrapper


def _wrap_prepare_cache(orig):
    @functools.wraps(orig)
    def wrapper(self, generation_config, model_kwargs, *args, **kwargs):
        out = orig(self, generation_config, model_kwargs, *args, **kwargs)
        mode = kwargs.get("generation_mode", args[0] if args else None)
        if (
            getattr(generation_config, "is_assistant", False)
            or getattr(mode, "value", mode) == "assisted_generation"
        ):
            cache = model_kwargs.get("past_key_values")
            if isinstance(cache, _cu.Cache):
                cache.activate_past_recording()
        return out

    return wrapper


_CACHE_WRAPPERS = {
    "update": _wrap_cache_update,
    "crop": _wrap_cache_crop,
    "activate_past_recording": _wrap_cache_activate,
    **{name: _wrap_cache_resize for name in _RESIZE_OPS},
}
if _NATIVE is not None:
    _CACHE_WRAPPERS["get_seq_length"] = _wrap_cache_get_seq_length

_CACHE_ADDED = {
    "state_update": _cache_state_update,
    "get_recurrent_state": _cache_get_recurrent_state,
    "is_recurrent_state_initialized": _cache_is_recurrent_state_initialized,
}


# hack / unhack


def _subclasses_of(roots) -> list[type]:
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


# the leading parameters a wrapper takes positionally; a subclass whose own method names others speaks
# another protocol (FLA's `FLACache.update(recurrent_state=..., layer_idx=...)`) and is left as it is
_WRAPPED_PARAMS = {"update": ("key_states", "value_states")}


def _speaks_stock_protocol(func, name: str, cls: type) -> bool:
    wanted = _WRAPPED_PARAMS.get(name)
    if wanted is None:
        return True
    if issubclass(cls, _cu.Cache):
        wanted = (*wanted, "layer_idx")
    try:
        params = list(inspect.signature(func).parameters.values())[1:]  # after self
    except (TypeError, ValueError):
        return True
    if any(p.kind is p.VAR_POSITIONAL for p in params[: len(wanted) + 1]):
        return True
    names = [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return tuple(names[: len(wanted)]) == wanted


def _patch_classes(roots, added: dict, wrappers: dict, extra_root_attrs, properties=None) -> None:
    for cls in _subclasses_of(roots):
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
            if not _speaks_stock_protocol(orig, name, cls):
                continue
            _set(cls, name, make(orig, name))
        for name, make in (properties or {}).items():
            # class attributes or properties (`is_croppable = True`): read through the class's own value
            orig = own.get(name, _MISSING)
            if orig is _MISSING or name in _saved.get(cls, {}):
                continue
            prop = make(orig, cls)
            if prop is not None:
                _set(cls, name, prop)


def hack_kv_cache_recurrent_state() -> None:
    """Patches every transformers cache layer class and `Cache` class to carry a recurrent state.

    Idempotent and thread-safe; calling it again also patches layer classes defined since the last call
    (about 20 us; code on a hot path checks `is_hacked()` first). See the module docstring for the API.
    """
    global _hacked
    with _lock:
        _patch_classes(_LAYER_ROOTS, _LAYER_ADDED, _LAYER_WRAPPERS, _root_attrs, _LAYER_PROPERTIES)
        _patch_classes((_cu.Cache,), _CACHE_ADDED, _CACHE_WRAPPERS, _cache_root_attrs)
        for name in _RESIZE_OPS:
            if not hasattr(_STATIC, name):
                _set(_STATIC, name, _static_resize_op(name))
        if not _STOCK_RECORDING:
            # 4.x has no past recording: turn it on where 5.x generate() does (assisted decoding's cache and
            # the assistant's own)
            from transformers.generation.utils import GenerationMixin

            name = "_prepare_cache_for_generation"
            if name in GenerationMixin.__dict__ and GenerationMixin not in _saved:
                _saved[GenerationMixin] = {}
                _set(GenerationMixin, name, _wrap_prepare_cache(GenerationMixin.__dict__[name]))
        _hacked = True


def _cache_root_attrs(root: type) -> dict:
    if hasattr(root, "activate_past_recording"):
        return {}
    return {"activate_past_recording": _cache_activate_past_recording}


def _root_attrs(root: type) -> dict:
    if root is _cu.CacheLayerMixin and not hasattr(root, "activate_past_recording"):
        return {
            "recurrent_state_initialized": False,
            "activate_past_recording": _layer_activate_past_recording,
        }
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


def token_count(layer) -> torch.Tensor | None:
    """The 0-dim int64 tensor in which a cache layer meant for compiled decode counts the tokens its
    recurrent state has absorbed (at a static address, moved in place by ``state_update``), or None on
    other layers. An exporter that rewinds a static cache between sequences rewinds it too, as it rewinds
    the keys' length (``swaa.convert.export``)."""
    count = getattr(layer, _COUNT, None)
    return count if isinstance(count, torch.Tensor) else None
