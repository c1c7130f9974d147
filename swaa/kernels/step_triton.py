"""A single-token (T == 1) decode step in one Triton kernel, for GLA and plain linear attention.

One launch reads the float32 state once, decays it, adds k^T v, writes it back and reads out
o = scale * q S from the registers it already holds: the memory floor of a decode step, with
one kernel launch of host overhead. Forward only (decode needs no gradients) and CUDA-graph
capturable. It can write the new state over the old one (`state_out=initial_state`), so a decode
step with a state at a static address allocates no state. Imports without triton;
`triton_step_available()` says whether it can run.
"""

from __future__ import annotations

import torch

from swaa.kernels.checks import FLA_DTYPES

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs
    triton = None

# value columns per program: a [BK, 32] float32 tile per program keeps register use low for
# K up to 256 while still giving B * H * V / 32 programs to spread over the GPU
_BLOCK_V = 32


def triton_step_available() -> bool:
    return triton is not None


def use_triton_step(q, *others) -> bool:
    """Whether `backend="auto"` should run a decode step with this kernel: CUDA tensors of a dtype
    FLA's kernels accept (the state is always float32), triton importable, and no gradients
    wanted (the kernel has no backward)."""
    if triton is None or q.device.type != "cuda" or q.dtype not in FLA_DTYPES:
        return False
    if torch.is_grad_enabled():
        return not any(x is not None and x.requires_grad for x in (q, *others))
    return True


if triton is not None:

    @triton.jit
    def _decode_step_kernel(
        q,
        k,
        v,
        g,
        h0,
        o,
        ht,
        scale,
        K: tl.constexpr,
        V: tl.constexpr,
        BK: tl.constexpr,
        BV: tl.constexpr,
        HAS_G: tl.constexpr,
        HAS_H0: tl.constexpr,
        STORE_HT: tl.constexpr,
    ):
        # program (i_v, i_bh): value columns [i_v * BV, (i_v + 1) * BV) of head row i_bh = b * H + h
        i_v = tl.program_id(0)
        i_bh = tl.program_id(1).to(tl.int64)
        o_k = tl.arange(0, BK)
        o_v = i_v * BV + tl.arange(0, BV)
        m_k = o_k < K
        m_v = o_v < V
        # q, k, g: [B, 1, H, K] and v, o: [B, 1, H, V], contiguous, so head row i_bh starts at i_bh * K (V)
        b_q = tl.load(q + i_bh * K + o_k, mask=m_k, other=0).to(tl.float32) * scale
        b_k = tl.load(k + i_bh * K + o_k, mask=m_k, other=0).to(tl.float32)
        b_v = tl.load(v + i_bh * V + o_v, mask=m_v, other=0).to(tl.float32)
        # state [B, H, K, V]: this program's [BK, BV] tile
        p_s = i_bh * K * V + o_k[:, None] * V + o_v[None, :]
        m_s = m_k[:, None] & m_v[None, :]
        b_s = b_k[:, None] * b_v[None, :]
        if HAS_H0:
            b_h = tl.load(h0 + p_s, mask=m_s, other=0).to(tl.float32)
            if HAS_G:
                b_g = tl.load(g + i_bh * K + o_k, mask=m_k, other=0).to(tl.float32)
                b_h = b_h * tl.exp(b_g)[:, None]
            b_s += b_h
        b_o = tl.sum(b_s * b_q[:, None], axis=0)
        tl.store(o + i_bh * V + o_v, b_o.to(o.dtype.element_ty), mask=m_v)
        # ht may be h0 itself (the in-place step). Safe: the tiles of different (i_v, i_bh) are
        # disjoint, so no other program reads or writes this one; this program loaded its whole
        # tile above (BK >= K covers every key row), and each stored element is computed from the
        # value loaded at the same address, so it cannot be written before it has been read
        if STORE_HT:
            tl.store(ht + p_s, b_s, mask=m_s)


def decode_step_triton(q, k, v, g, scale, initial_state=None, output_final_state=False, *, state_out=None):
    """One token of GLA (or of plain linear attention when `g` is None) in one Triton kernel.

    Args:
        q, k (torch.Tensor): `[B, 1, H, K]` on CUDA, float16/bfloat16/float32.
        v (torch.Tensor): `[B, 1, H, V]`, same dtype.
        g (Optional[torch.Tensor]): `[B, 1, H, K]` log forget gate, or None (no decay).
        scale (float): multiplies q.
        initial_state (Optional[torch.Tensor]): `[B, H, K, V]` float32. Default: zeros.
        output_final_state (bool): return the updated state.
        state_out (Optional[torch.Tensor]): contiguous `[B, H, K, V]` float32 buffer the new state
            is written into, and returned as the final state; may be `initial_state` itself (the
            in-place step). Default: None (a new tensor when `output_final_state`).

    Returns:
        o `[B, 1, H, V]` in v's dtype and the new state `[B, H, K, V]` float32 (or None).
        No autograd: call it only where no gradients are needed.
    """
    B, T, H, K = q.shape
    V = v.shape[-1]
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    g = g.contiguous() if g is not None else None
    h0 = initial_state.contiguous() if initial_state is not None else None
    o = torch.empty_like(v)
    if state_out is not None:
        ht = state_out
    elif output_final_state:
        ht = torch.empty(B, H, K, V, device=q.device, dtype=torch.float32)
    else:
        ht = None
    BK = triton.next_power_of_2(K)
    grid = (triton.cdiv(V, _BLOCK_V), B * H)
    # unused pointer arguments get any valid tensor; the constexpr flags keep them untouched
    _decode_step_kernel[grid](
        q,
        k,
        v,
        g if g is not None else q,
        h0 if h0 is not None else o,
        o,
        ht if ht is not None else o,
        scale,
        K=K,
        V=V,
        BK=BK,
        BV=_BLOCK_V,
        HAS_G=g is not None,
        HAS_H0=h0 is not None,
        STORE_HT=ht is not None,
    )
    return o, ht
