"""A whole decode step of a converted layer's recurrence in one kernel: q/k RMSNorm, rotary embedding,
the log-sigmoid gate, grouped kv heads, padding, the state update and the read-out.

What a converted GLA layer does to one new token between its projections and its output norm is a
dozen small elementwise kernels in eager PyTorch (two norms, three or four for each rotary embedding, two
for the gate, three copies to expand grouped kv heads), each costing a launch, which is what an eager
decode step is bound by. Here one Triton program per ``(value tile, batch row, head)`` loads the raw
projections once and does all of it in registers, in float32.

Math, per batch row b, head h and its kv head j = h // (H / Hk), with x' the RMSNorm of x
(``x * rsqrt(mean(x^2) + eps) * w``) and rot(x) = ``cat(-x[D/2:], x[:D/2])``:

    q~ = q' cos + rot(q') sin,   k~ = k' cos + rot(k') sin        (each step optional)
    g  = logsigmoid(gate_logits[b, j]) / gate_normalizer          (GLA; none for linear attention)
    S  = diag(exp(g)) S + k~^T v[b, j],   o = scale * q~ S

A padding row (``keep[b]`` False) adds nothing and decays nothing. ``fused_decode_step_torch`` is the
same computation in torch (the twin the tests compare with, and the path off CUDA).
"""

from __future__ import annotations

import torch

from swaa.kernels.checks import FLA_DTYPES

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs
    triton = None

__all__ = ["fused_decode_step", "fused_decode_step_torch", "fused_step_available"]

_BLOCK_V = 32


def fused_step_available(q: torch.Tensor) -> bool:
    """Whether the Triton kernel can run on ``q``: CUDA, a supported dtype, triton importable."""
    return triton is not None and q.device.type == "cuda" and q.dtype in FLA_DTYPES


def _rms(x, w, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def _rotate(x, cos, sin):
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), -1) * sin


def fused_decode_step_torch(
    q,
    k,
    v,
    gate_logits=None,
    *,
    state,
    scale,
    gate_normalizer=1.0,
    q_norm_weight=None,
    k_norm_weight=None,
    norm_eps=1e-6,
    cos=None,
    sin=None,
    keep=None,
    state_out=None,
):
    """The torch twin of :func:`fused_decode_step`, same arguments; float32 inside (float64 for float64)."""
    dt = torch.float64 if q.dtype == torch.float64 else torch.float32
    B, _, H, D = q.shape
    Hk = k.shape[2]
    qf, kf, vf = q[:, 0].to(dt), k[:, 0].to(dt), v[:, 0].to(dt)  # [B, H, D], [B, Hk, D], [B, Hk, V]
    if q_norm_weight is not None:
        qf = _rms(qf, q_norm_weight.to(dt), norm_eps)
    if k_norm_weight is not None:
        kf = _rms(kf, k_norm_weight.to(dt), norm_eps)
    if cos is not None:
        c, s = cos[:, 0].to(dt)[:, None], sin[:, 0].to(dt)[:, None]  # [B or 1, 1, D]
        qf, kf = _rotate(qf, c, s), _rotate(kf, c, s)
    g = None
    if gate_logits is not None:
        g = torch.nn.functional.logsigmoid(gate_logits[:, 0].to(dt)) / gate_normalizer
    if keep is not None:
        row = keep.to(dt)[:, None, None]
        kf, vf = kf * row, vf * row
        g = g * row if g is not None else None
    groups = H // Hk
    kf, vf = kf.repeat_interleave(groups, 1), vf.repeat_interleave(groups, 1)
    S = state.to(dt)
    if g is not None:
        S = S * g.repeat_interleave(groups, 1).exp()[..., None]
    S = S + kf[..., None] * vf[..., None, :]
    o = (scale * qf[..., None, :] @ S).squeeze(-2)  # [B, H, V]
    out = state if state_out is None else state_out
    out.copy_(S)
    return o[:, None].to(v.dtype), out


if triton is not None:

    @triton.jit
    def _fused_decode_kernel(
        q,
        k,
        v,
        gl,
        wq,
        wk,
        cos,
        sin,
        keep,
        h0,
        o,
        ht,
        scale,
        normalizer,
        eps,
        cos_stride,
        H: tl.constexpr,
        HK: tl.constexpr,
        D: tl.constexpr,
        V: tl.constexpr,
        BD: tl.constexpr,
        BV: tl.constexpr,
        HAS_G: tl.constexpr,
        QK_NORM: tl.constexpr,
        ROPE: tl.constexpr,
        HAS_KEEP: tl.constexpr,
    ):
        # program (i_v, i_bh): value columns [i_v * BV, (i_v + 1) * BV) of head h of batch row b
        i_v = tl.program_id(0)
        i_bh = tl.program_id(1).to(tl.int64)
        i_b = i_bh // H
        i_h = i_bh % H
        i_bk = i_b * HK + i_h // (H // HK)  # the kv head row this query head reads
        o_d = tl.arange(0, BD)
        o_v = i_v * BV + tl.arange(0, BV)
        m_d = o_d < D
        m_v = o_v < V
        # rotate-half partner of each dim: d + D/2 for the first half (negated), d - D/2 for the second
        half = D // 2
        o_p = tl.where(o_d < half, o_d + half, o_d - half)
        sign = tl.where(o_d < half, -1.0, 1.0)

        b_q = tl.load(q + i_bh * D + o_d, mask=m_d, other=0).to(tl.float32)
        b_k = tl.load(k + i_bk * D + o_d, mask=m_d, other=0).to(tl.float32)
        b_qp = tl.load(q + i_bh * D + o_p, mask=m_d, other=0).to(tl.float32)
        b_kp = tl.load(k + i_bk * D + o_p, mask=m_d, other=0).to(tl.float32)
        if QK_NORM:
            r_q = 1.0 / tl.sqrt(tl.sum(b_q * b_q, axis=0) / D + eps)
            r_k = 1.0 / tl.sqrt(tl.sum(b_k * b_k, axis=0) / D + eps)
            w_q = tl.load(wq + o_d, mask=m_d, other=0).to(tl.float32)
            w_k = tl.load(wk + o_d, mask=m_d, other=0).to(tl.float32)
            w_qp = tl.load(wq + o_p, mask=m_d, other=0).to(tl.float32)
            w_kp = tl.load(wk + o_p, mask=m_d, other=0).to(tl.float32)
            b_q, b_qp = b_q * r_q * w_q, b_qp * r_q * w_qp
            b_k, b_kp = b_k * r_k * w_k, b_kp * r_k * w_kp
        if ROPE:
            b_c = tl.load(cos + i_b * cos_stride + o_d, mask=m_d, other=0).to(tl.float32)
            b_s = tl.load(sin + i_b * cos_stride + o_d, mask=m_d, other=0).to(tl.float32)
            b_q = b_q * b_c + sign * b_qp * b_s
            b_k = b_k * b_c + sign * b_kp * b_s
        b_v = tl.load(v + i_bk * V + o_v, mask=m_v, other=0).to(tl.float32)
        if HAS_KEEP:
            row = tl.load(keep + i_b).to(tl.float32)
            b_k = b_k * row
            b_v = b_v * row
        p_s = i_bh * D * V + o_d[:, None] * V + o_v[None, :]
        m_s = m_d[:, None] & m_v[None, :]
        b_h = tl.load(h0 + p_s, mask=m_s, other=0).to(tl.float32)
        if HAS_G:
            x = tl.load(gl + i_bk * D + o_d, mask=m_d, other=0).to(tl.float32)
            # logsigmoid(x) = min(x, 0) - log(1 + exp(-|x|)), stable for either sign
            b_g = (tl.minimum(x, 0.0) - tl.log(1.0 + tl.exp(-tl.abs(x)))) / normalizer
            if HAS_KEEP:
                b_g = b_g * row
            b_h = b_h * tl.exp(b_g)[:, None]
        b_s = b_h + b_k[:, None] * b_v[None, :]
        b_o = tl.sum(b_s * (b_q * scale)[:, None], axis=0)
        tl.store(o + i_bh * V + o_v, b_o.to(o.dtype.element_ty), mask=m_v)
        # ht may be h0 (in place): each program reads its whole tile before it writes it, and the
        # tiles of different programs are disjoint
        tl.store(ht + p_s, b_s, mask=m_s)


def fused_decode_step(
    q,
    k,
    v,
    gate_logits=None,
    *,
    state,
    scale,
    gate_normalizer=1.0,
    q_norm_weight=None,
    k_norm_weight=None,
    norm_eps=1e-6,
    cos=None,
    sin=None,
    keep=None,
    state_out=None,
):
    """One token of a converted layer's recurrence, from its raw projections to its read-out.

    Args:
        q (torch.Tensor): ``[B, 1, H, D]``, the query projection before any norm or rotation.
        k (torch.Tensor): ``[B, 1, Hk, D]`` (H a multiple of Hk: grouped kv heads), likewise raw.
        v (torch.Tensor): ``[B, 1, Hk, V]``.
        gate_logits (torch.Tensor, Optional): ``[B, 1, Hk, D]``; the log decay is
            ``logsigmoid(gate_logits) / gate_normalizer``. None: no decay (linear attention).
        state (torch.Tensor): ``[B, H, D, V]`` float32 (float64 for float64), the state before the token.
        scale (float): multiplies the rotated query.
        gate_normalizer (float): see ``gate_logits``. Default: 1.
        q_norm_weight, k_norm_weight (torch.Tensor, Optional): ``[D]`` RMSNorm weights; None skips the norm.
        norm_eps (float): RMSNorm epsilon. Default: 1e-6.
        cos, sin (torch.Tensor, Optional): ``[B or 1, 1, D]`` rotary tables (transformers' rotate-half
            convention); None skips the rotation.
        keep (torch.Tensor, Optional): ``[B]`` bool, False for a padding row. Default: None (all real).
        state_out (torch.Tensor, Optional): where the new state goes; None: ``state`` itself (in place).

    Returns:
        ``(o [B, 1, H, V] in v's dtype, the new state)``. Forward only (no autograd), no host sync.
    """
    if not fused_step_available(q):
        return fused_decode_step_torch(
            q, k, v, gate_logits, state=state, scale=scale, gate_normalizer=gate_normalizer,
            q_norm_weight=q_norm_weight, k_norm_weight=k_norm_weight, norm_eps=norm_eps, cos=cos,
            sin=sin, keep=keep, state_out=state_out,
        )  # fmt: skip
    return _fused_decode_triton(
        q, k, v, gate_logits, state, scale, gate_normalizer, q_norm_weight, k_norm_weight, norm_eps, cos,
        sin, keep, state_out,
    )  # fmt: skip


def _fused_decode_triton(
    q, k, v, gate_logits, state, scale, gate_normalizer, q_norm_weight, k_norm_weight, norm_eps, cos, sin,
    keep, state_out,
):  # fmt: skip
    # the launch itself, separate so that the tests can run it under Triton's interpreter on CPU
    B, _, H, D = q.shape
    Hk, V = k.shape[2], v.shape[-1]
    out = state if state_out is None else state_out
    o = torch.empty(B, 1, H, V, device=q.device, dtype=v.dtype)
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    gl = gate_logits.contiguous() if gate_logits is not None else q
    rope = cos is not None
    if rope:
        cos, sin = cos.contiguous(), sin.contiguous()
        cos_stride = 0 if cos.shape[0] == 1 else D
    else:
        cos = sin = q
        cos_stride = 0
    grid = (triton.cdiv(V, _BLOCK_V), B * H)
    _fused_decode_kernel[grid](
        q, k, v, gl,
        q_norm_weight if q_norm_weight is not None else q,
        k_norm_weight if k_norm_weight is not None else q,
        cos, sin,
        keep.to(torch.float32) if keep is not None else q,
        state, o, out,
        float(scale), float(gate_normalizer), float(norm_eps), cos_stride,
        H=H, HK=Hk, D=D, V=V, BD=triton.next_power_of_2(D), BV=_BLOCK_V,
        HAS_G=gate_logits is not None, QK_NORM=q_norm_weight is not None, ROPE=rope,
        HAS_KEEP=keep is not None,
    )  # fmt: skip
    return o, out
