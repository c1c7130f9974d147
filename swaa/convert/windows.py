"""A running text as token windows: what attention transfer learns from and perplexity scores."""

from __future__ import annotations

import torch

from swaa.validation import check_int

__all__ = ["check_windows", "split_windows"]


def check_windows(window, max_windows) -> None:
    """Refuse a window of fewer than 2 tokens or a window count that is not a positive int (or None)."""
    check_int("window", window, minimum=2)
    check_int("max_windows", max_windows, minimum=1, allow_none=True)


def split_windows(input_ids, window: int = 512, max_windows: int | None = None) -> torch.Tensor:
    """``input_ids`` as windows ``[num_windows, T]``: a running text ``[N]`` cut into ``window``-token
    windows (the rest dropped), or rows given as they are; at most ``max_windows``."""
    if not isinstance(input_ids, torch.Tensor) or input_ids.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"input_ids must be an int64/int32 tensor, got {type(input_ids).__name__}")
    check_windows(window, max_windows)
    if input_ids.dim() == 1:
        if input_ids.numel() < window:
            raise ValueError(f"input_ids: need at least window={window} tokens, got {input_ids.numel()}")
        windows = input_ids[: input_ids.numel() // window * window].view(-1, window)
    elif input_ids.dim() == 2:
        if input_ids.shape[0] < 1 or input_ids.shape[1] < 2:
            raise ValueError(
                f"input_ids: need at least one window of 2 or more tokens, got {list(input_ids.shape)}"
            )
        windows = input_ids
    else:
        raise ValueError(f"input_ids must be [N] or [num_windows, T], got shape {tuple(input_ids.shape)}")
    return windows[:max_windows] if max_windows is not None else windows
