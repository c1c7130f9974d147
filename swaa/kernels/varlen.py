"""Packed variable-length sequences (`cu_seqlens`) for the torch implementation.

The torch chunked kernels are batched, so packed sequences are scattered into a right-padded
batch `[N, T_max, ...]`, run together, and gathered back. Padding with zeros is exact for both
recurrences: k = 0 adds nothing to the state and g = 0 decays nothing, so a padded sequence's
final state is its true final state (an empty sequence keeps its initial state).
"""

from __future__ import annotations

import torch


class Packing:
    """Index maps between a packed `[1, T, ...]` tensor and a padded `[N, T_max, ...]` batch."""

    def __init__(self, cu_seqlens: torch.Tensor):
        cu = cu_seqlens.to(torch.long)
        lens = cu[1:] - cu[:-1]
        self.N = lens.numel()
        self.T_max = int(lens.max().item()) if self.N else 0
        # seq_id[t], pos[t]: which sequence packed token t belongs to, and its offset in it
        self.seq_id = torch.repeat_interleave(torch.arange(self.N, device=cu.device), lens)
        self.pos = torch.arange(self.seq_id.numel(), device=cu.device) - cu[self.seq_id]

    def pad(self, x: torch.Tensor) -> torch.Tensor:
        # x [1, T, H, D] -> [N, T_max, H, D], zeros after each sequence's end
        out = x.new_zeros(self.N, self.T_max, *x.shape[2:])
        return out.index_put((self.seq_id, self.pos), x[0])

    def unpad(self, x: torch.Tensor) -> torch.Tensor:
        # x [N, T_max, H, D] -> [1, T, H, D]
        return x[self.seq_id, self.pos].unsqueeze(0)
