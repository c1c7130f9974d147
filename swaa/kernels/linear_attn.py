"""Linear attention: public dispatching function, torch chunked form, single-step decode.

Recurrence (per head): S_t = S_{t-1} + k_t^T v_t ;  o_t = scale * q_t S_t.
With ``normalize=True`` also z_t = z_{t-1} + k_t and
o_t = (scale * q_t S_t) / (scale * q_t . z_t + NORMALIZE_EPS): scale multiplies q in both the
numerator and the normalizer (so it cancels up to eps), as in FLA.
"""

from __future__ import annotations

import torch

from swaa.kernels import fla_adapter
from swaa.kernels._checks import check_inputs, state_dtype_for
from swaa.kernels._varlen import Packing
from swaa.kernels.gla import _blocks, _chunk_size, _run_segments
from swaa.kernels.naive import NORMALIZE_EPS
from swaa.kernels.step_triton import decode_step_triton, use_triton_step

__all__ = ["linear_attn", "chunk_linear_attn_torch", "linear_attn_step_torch", "NORMALIZE_EPS"]


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


def _normalize_fla_output(o, q, k, v_dtype, scale, z0, cu_seqlens):
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


def _torch_linear_attn(q, k, v, scale, initial_state, output_final_state, normalize, cu_seqlens):
    if cu_seqlens is not None:
        pk = Packing(cu_seqlens)
        o, S = chunk_linear_attn_torch(
            pk.pad(q), pk.pad(k), pk.pad(v), scale, initial_state, output_final_state, normalize
        )
        return pk.unpad(o), S
    if q.shape[1] == 0:
        dt = state_dtype_for(q.dtype)
        B, _, H, K = q.shape
        S0, z0 = initial_state if (normalize and initial_state is not None) else (initial_state, None)
        S = S0 if S0 is not None else q.new_zeros(B, H, K, v.shape[-1], dtype=dt)
        z = z0 if z0 is not None else q.new_zeros(B, H, K, dtype=dt)
        return v.new_zeros(v.shape), (((S, z) if normalize else S) if output_final_state else None)
    if q.shape[1] == 1:
        return linear_attn_step_torch(q, k, v, scale, initial_state, output_final_state, normalize)
    return chunk_linear_attn_torch(q, k, v, scale, initial_state, output_final_state, normalize)


def linear_attn(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float | None = None,
    initial_state=None,
    output_final_state: bool = False,
    normalize: bool = False,
    cu_seqlens: torch.LongTensor | None = None,
    backend: str = "auto",
):
    r"""Linear attention: S_t = S_{t-1} + k_t^T v_t ; o_t = scale * q_t S_t.

    Args:
        q (torch.Tensor):
            queries of shape `[B, T, H, K]` (after any feature map).
        k (torch.Tensor):
            keys of shape `[B, T, H, K]`, same dtype as q. Zero k at padding positions to leave
            the state untouched there.
        v (torch.Tensor):
            values of shape `[B, T, H, V]`, same dtype as q.
        scale (Optional[float]):
            multiplies q. Default: `K ** -0.5`.
        initial_state (Optional[torch.Tensor | tuple]):
            state before the first token: `[N, H, K, V]`, or with `normalize=True` a tuple
            `(kv_state [N, H, K, V], z_state [N, H, K])`; N = B (or the number of packed
            sequences); float32 (float64 for float64 inputs). Gradients flow into it.
            Default: `None` (zeros).
        output_final_state (bool):
            return the state after the last token. Default: `False`.
        normalize (bool):
            divide by the running key sum: z_t = z_{t-1} + k_t (inclusive of t) and
            o_t = (scale * q_t S_t) / (scale * q_t . z_t + NORMALIZE_EPS), NORMALIZE_EPS = 1e-10
            (FLA's value). Meant for non-negative feature maps. Default: `False`.
        cu_seqlens (Optional[torch.LongTensor]):
            `[N + 1]` offsets of N packed sequences in a B == 1 batch; each sequence starts
            from its own initial state. Default: `None`.
        backend (str):
            "auto" (FLA's Triton kernels for CUDA tensors when fla imports, torch otherwise; a
            single token without cu_seqlens takes the decode step: swaa's one-kernel Triton
            step on CUDA when unnormalized and no gradients are wanted, else a few torch ops),
            "fla" (FLA or an error), or "torch". With FLA the normalization runs in float32 torch on top of
            FLA's unnormalized kernel. Default: "auto".

    Returns:
        o (torch.Tensor): `[B, T, H, V]` in v's dtype.
        final_state: `[N, H, K, V]` (or the `(kv_state, z_state)` tuple) if `output_final_state`, else None.
    """
    problem = check_inputs(
        q,
        k,
        v,
        gated=False,
        scale=scale,
        initial_state=initial_state,
        output_final_state=output_final_state,
        normalize=normalize,
        cu_seqlens=cu_seqlens,
        backend=backend,
    )
    scale = problem.scale  # the default K ** -0.5 resolved by check_inputs
    if q.shape[1] == 1 and cu_seqlens is None and backend == "auto":
        # decode: one kernel of ours on CUDA when it applies, else a few torch ops
        if not normalize and use_triton_step(q, k, v, initial_state):
            return decode_step_triton(q, k, v, None, scale, initial_state, output_final_state)
        return linear_attn_step_torch(q, k, v, scale, initial_state, output_final_state, normalize)
    if fla_adapter.use_fla(backend, q):
        S0, z0 = initial_state if (normalize and initial_state is not None) else (initial_state, None)
        # FLA's normalized state changed layout and precision across releases: normalize here
        o, S = fla_adapter.linear_attn(q, k, v, scale, S0, output_final_state, cu_seqlens)
        if normalize:
            o, z = _normalize_fla_output(o, q, k, v.dtype, scale, z0, cu_seqlens)
            return o, ((S, z) if output_final_state else None)
        return o.to(v.dtype), S
    return _torch_linear_attn(q, k, v, scale, initial_state, output_final_state, normalize, cu_seqlens)
