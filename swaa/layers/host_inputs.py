"""What a drop-in layer reads from the host model's call: which new positions are padding (from the
mask transformers builds), where packed sequences start, and which keyword carries the cache.

transformers never hands an attention module the user's 2D mask, and the cache arrives under a
different name in different releases; these functions turn what arrives into what the kernels need
(see ``shared/TRANSFORMERS_NOTES.md``).
"""

from __future__ import annotations

import inspect
import weakref

import torch

__all__ = ["cache_argument", "check_state_batch", "packed_cu_seqlens", "pick_cache", "tokens_to_keep"]


def packed_cu_seqlens(position_ids: torch.Tensor, batch_size: int, q_len: int) -> torch.Tensor | None:
    """Boundaries of sequences packed along the time axis: a position that falls back to 0 starts a new
    sequence, as ``DataCollatorWithFlattening`` lays them out (and so does every row).

    Only a restart at 0 counts, not any step other than +1 as transformers' own mask check reads it: a
    vision-language model's text positions repeat over image tokens inside one sequence, and left padding
    (positions ``1, 1, 0, 1, 2``) ends with a restart at the first real token, which is harmless here since
    padded tokens are zeroed anyway.

    Args:
        position_ids (torch.Tensor): ``[B, T]`` or ``[1, T]``; anything else (the 3D positions of
            multimodal RoPE) is not read, and None is returned.
        batch_size, q_len (int): B and T of the hidden states.

    Returns:
        ``cu_seqlens`` ``[N + 1]`` (int64) over the ``B * T`` tokens flattened row after row, or None when
        each row holds one sequence. Reading the values costs one device sync, paid once per forward: the
        answer is kept for the next layer that gets the same ``position_ids`` tensor.
    """
    if (
        position_ids.dim() != 2
        or position_ids.shape[-1] != q_len
        or position_ids.shape[0] not in (1, batch_size)
    ):
        return None
    # inference tensors keep no version counter, so they are read every time
    key = None if position_ids.is_inference() else (position_ids._version, batch_size, q_len)
    seen = _LAST_PACKING.get("entry")  # one tuple, replaced whole: safe to read while another thread writes
    if key is not None and seen is not None and seen[0]() is position_ids and seen[1] == key:
        return seen[2]
    pos = position_ids.expand(batch_size, q_len)
    starts = torch.ones(batch_size, q_len, dtype=torch.bool, device=pos.device)
    starts[:, 1:] = pos[:, 1:] == 0
    value = None
    if bool(starts[:, 1:].any()):
        first = starts.flatten().nonzero().flatten()
        value = torch.cat([first, first.new_tensor([batch_size * q_len])])
    if key is not None:
        _LAST_PACKING["entry"] = (weakref.ref(position_ids), key, value)
    return value


# the last packing read: every layer of one forward gets the same position_ids tensor
_LAST_PACKING: dict = {}


def tokens_to_keep(attention_mask, q_len: int, offset) -> torch.Tensor | None:
    """Which of the ``q_len`` new positions are real tokens (True) rather than padding (False).

    transformers never hands an attention module the user's 2D mask; it builds one per layer type
    (see ``shared/TRANSFORMERS_NOTES.md``). What arrives, and how it is read:

    - ``None``: nothing is padded (SDPA drops the mask then, including single-token decode steps).
    - 4D ``[B, 1 or heads, q, kv]`` bool (SDPA; True = may attend) or float (eager; 0 = may attend,
      a large negative number = masked): a padding position cannot attend to itself, so the mask's
      diagonal for the new queries, column ``offset + i`` for query ``i``, says which are real.
    - 3D ``[B, q, kv]``: read as the 4D mask with its head axis already dropped.
    - 2D ``[B, kv]`` (flash-attention style, 1 = real; also what a user may pass to the layer
      directly): columns ``offset .. offset + q_len - 1``, or the whole mask when its width is ``q_len``.

    Args:
        attention_mask: one of the above.
        q_len (int): number of new positions T.
        offset (int or 0-dim tensor): kv index of the first new position (tokens already seen);
            clamped to the mask's width, so a mask that only covers the new tokens also works.

    Returns:
        ``[B, T]`` bool, or None when no mask was given.
    """
    if attention_mask is None:
        return None
    if not isinstance(attention_mask, torch.Tensor):
        raise TypeError(
            "attention_mask must be None, a 2D [B, T] padding mask or a 3D/4D [B, (1,) q, kv] mask tensor, "
            f"got {type(attention_mask).__name__} (flex-attention BlockMasks carry no padding we can read)"
        )
    kv_len = attention_mask.shape[-1]
    if attention_mask.dim() == 2:
        keep = attention_mask
    elif attention_mask.dim() in (3, 4):
        if attention_mask.shape[-2] != q_len:
            raise ValueError(
                f"attention_mask must have {q_len} query rows (the new tokens), got shape {tuple(attention_mask.shape)}"
            )
        mask = attention_mask if attention_mask.dim() == 3 else attention_mask[:, 0]
        keep = mask  # rows x columns; the diagonal is taken below
    else:
        raise ValueError(f"attention_mask must be 2D, 3D or 4D, got shape {tuple(attention_mask.shape)}")
    if kv_len < q_len:
        raise ValueError(
            f"attention_mask must cover the {q_len} new positions, got shape {tuple(attention_mask.shape)}"
        )

    # offset may be a tensor (cache_position[0]); keep it one so compiled graphs need no .item()
    offset = torch.as_tensor(offset, device=attention_mask.device).clamp(0, kv_len - q_len)
    cols = offset + torch.arange(q_len, device=attention_mask.device)
    if keep.dim() == 2:
        keep = keep[:, cols]
    else:
        keep = keep[:, torch.arange(q_len, device=attention_mask.device), cols]
    if keep.dtype == torch.bool:
        return keep
    if keep.is_floating_point() and attention_mask.dim() != 2:
        # additive mask: 0 where attending, finfo.min (or -inf) where masked
        return keep > torch.finfo(keep.dtype).min / 2
    return keep != 0


def pick_cache(past_key_values, kwargs: dict):
    """The cache object, whatever the host calls it: ``past_key_values`` (transformers 4.5x),
    ``cache`` (5.2x decoder layers), or ``past_key_value`` (older families)."""
    for name in ("cache", "past_key_value"):
        other = kwargs.pop(name, None)
        if past_key_values is None:
            past_key_values = other
    return past_key_values


def cache_argument(model) -> str:
    """The keyword under which a host model's ``forward`` takes its cache: ``cache`` (transformers >= 5.24)
    or ``past_key_values``. ``model`` may be the model or its class."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def check_state_batch(state, batch_size: int):
    if state is None:
        return
    first = state[0] if isinstance(state, tuple) else state
    if first.shape[0] != batch_size:
        raise ValueError(
            f"past_key_values holds a recurrent state for batch size {first.shape[0]}, but hidden_states has "
            f"batch size {batch_size}"
        )
