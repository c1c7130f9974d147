"""Linear attention in torch: the chunked form, the single-token step, and the normalization
applied on top of FLA's unnormalized kernel. The public function is `swaa.kernels.linear_attn`.

Recurrence (per head): S_t = S_{t-1} + k_t^T v_t ;  o_t = scale * q_t S_t.
With ``normalize=True`` also z_t = z_{t-1} + k_t and
o_t = (scale * q_t S_t) / (scale * q_t . z_t + NORMALIZE_EPS): scale multiplies q in both the
numerator and the normalizer (so it cancels up to eps), as in FLA.
"""

from __future__ import annotations

import torch

from swaa.kernels.checks import state_dtype_for
from swaa.kernels.gla import _blocks, _chunk_size, _run_segments
from swaa.kernels.naive import NORMALIZE_EPS


def _exclusive_cumsum(x: torch.Tensor, dim: int, start: torch.Tensor | None) -> torch.Tensor:
    # running sum of the entries before each index along `dim`, starting at `start`
    c = x.cumsum(dim)
    prev = torch.cat([torch.zeros_like(x.narrow(dim, 0, 1)), c.narrow(dim, 0, x.shape[dim] - 1)], dim)
    return prev if start is None else prev + start.unsqueeze(dim)


def chunk_linear_attn_torch(q, k, v, scale, initial_state=None, output_final_state=False, normalize=False):
    """Chunked parallel linear attention in torch (no argument checks; use `linear_attn`).

    Args:
        q, k (torch.Tensor): `[B, T, H, K]`.
        v (torch.Tensor): `[B, T, H, V]`.
        scale (float): multiplies q.
        initial_state: `[B, H, K, V]`, or `(kv [B, H, K, V], z [B, H, K])` when normalize, or None.
        output_final_state (bool): return the state after the last token.
        normalize (bool): divide by scale * q_t . z_t + NORMALIZE_EPS.

    Returns:
        o `[B, T, H, V]` in v's dtype, and the final state (same structure as initial_state) or None.
    """

    def segment(q, k, v, state):
        return _chunk_linear_attn_segment(q, k, v, scale, state, normalize)

    o, state = _run_segments(segment, (q, k, v), initial_state)
    return o, (state if output_final_state else None)


def _chunk_linear_attn_segment(q, k, v, scale, initial_state, normalize):
    # one segment of chunk_linear_attn_torch; returns (o [B, H, N, C, V] in the state dtype, final state)
    B, T, H, K = q.shape
    dt = state_dtype_for(q.dtype)
    S0, z0 = initial_state if (normalize and initial_state is not None) else (initial_state, None)
    C = _chunk_size(T)
    qc = _blocks(q, dt, C).mul_(scale)
    kc, vc = _blocks(k, dt, C), _blocks(v, dt, C)  # [B, H, N, C, D]; padding adds nothing
    A = (qc @ kc.transpose(-1, -2)).tril_()  # [B, H, N, C, C]; tril_ ~15x faster than a mask on CPU
    U = kc.transpose(-1, -2) @ vc  # [B, H, N, K, V]: each chunk's contribution to the state
    S_start = _exclusive_cumsum(U, 2, S0)
    o = A @ vc + qc @ S_start
    S = S_start[:, :, -1] + U[:, :, -1]
    if normalize:
        ksum = kc.sum(-2)  # [B, H, N, K]
        z_start = _exclusive_cumsum(ksum, 2, z0)
        den = A.sum(-1, keepdim=True) + (qc * z_start.unsqueeze(-2)).sum(-1, keepdim=True)
        o = o / (den + NORMALIZE_EPS)
        z = z_start[:, :, -1] + ksum[:, :, -1]
    return o, ((S, z) if normalize else S)


def linear_attn_step_torch(q, k, v, scale, initial_state=None, output_final_state=False, normalize=False):
    """One token of linear attention: a state update and a read, in a few torch ops (no host
    syncs, so it can be captured in a CUDA graph). Same arguments as `chunk_linear_attn_torch`, T == 1."""
    dt = state_dtype_for(q.dtype)
    S0, z0 = initial_state if (normalize and initial_state is not None) else (initial_state, None)
    q1, k1, v1 = q[:, 0].to(dt) * scale, k[:, 0].to(dt), v[:, 0].to(dt)  # [B, H, K], [B, H, V]
    S = k1.unsqueeze(-1) * v1.unsqueeze(-2)
    if S0 is not None:
        S = S + S0
    o = (q1.unsqueeze(-2) @ S).squeeze(-2)  # [B, H, V]
    if normalize:
        z = k1 if z0 is None else z0 + k1
        o = o / ((q1 * z).sum(-1, keepdim=True) + NORMALIZE_EPS)
    o = o.unsqueeze(1).to(v.dtype)
    if not output_final_state:
        return o, None
    return o, ((S, z) if normalize else S)


def normalize_fla_output(o, q, k, v_dtype, scale, z0, cu_seqlens):
    """Normalize FLA's unnormalized output in float32 torch; returns (o, z_final [N, H, K])."""
    kf = k.float()
    # running key sums with a leading zero row, so sequence boundaries are differences of it
    kcum = torch.cat([kf.new_zeros(kf.shape[0], 1, *kf.shape[2:]), kf.cumsum(1)], 1)  # [B, T+1, H, K]
    if cu_seqlens is None:
        z_tok = kcum[:, 1:] + (z0.unsqueeze(1) if z0 is not None else 0)
        z_final = z_tok[:, -1]
    else:
        cu = cu_seqlens.long()
        T = q.shape[1]
        seq_id = torch.searchsorted(cu[1:], torch.arange(T, device=q.device), right=True)
        base = -kcum[0, cu[:-1]] + (z0 if z0 is not None else 0)  # [N, H, K]
        z_tok = (kcum[0, 1:] + base[seq_id]).unsqueeze(0)
        z_final = kcum[0, cu[1:]] + base
    den = (q.float() * scale * z_tok).sum(-1, keepdim=True) + NORMALIZE_EPS
    return (o.float() / den).to(v_dtype), z_final
