"""The oracles: token-by-token recurrences written to be checked against the papers, not to be fast.

Same signatures and defaults as `swaa.kernels.linear_attn` / `swaa.kernels.gla` (minus `backend`).
They compute in the state dtype (float64 for float64 inputs), so in float64 they are the
reference every fast path is tested against.
"""

from __future__ import annotations

import torch

from swaa.kernels.checks import check_inputs

# added to the normalizer q_t . z_t of normalized linear attention (the value FLA uses)
NORMALIZE_EPS = 1e-10


def _recurrence(q, k, v, g, scale, S, z):
    # q, k, g [T, H, K]; v [T, H, V]; S [H, K, V]; z [H, K] or None; all in the state dtype
    outs = []
    for t in range(q.shape[0]):
        if g is not None:
            S = S * g[t].exp()[:, :, None]
        S = S + k[t][:, :, None] * v[t][:, None, :]
        o = torch.einsum("hk,hkv->hv", q[t] * scale, S)
        if z is not None:
            z = z + k[t]
            o = o / ((q[t] * scale * z).sum(-1, keepdim=True) + NORMALIZE_EPS)
        outs.append(o)
    o = torch.stack(outs) if outs else v.new_zeros(v.shape)
    return o, S, z


def _run(q, k, v, g, p, initial_state, output_final_state, normalize, cu_seqlens):
    dt, v_dtype = p.state_dtype, v.dtype
    q, k, v = q.to(dt), k.to(dt), v.to(dt)
    g = g.to(dt) if g is not None else None
    if normalize and initial_state is not None:
        S0, z0 = initial_state
    else:
        S0, z0 = initial_state, None
    if S0 is None:
        S0 = q.new_zeros(p.N, p.H, p.K, p.V)
    if normalize and z0 is None:
        z0 = q.new_zeros(p.N, p.H, p.K)
    # one (batch row, start, end) per independent sequence
    if cu_seqlens is None:
        spans = [(b, 0, p.T) for b in range(p.B)]
    else:
        offs = cu_seqlens.tolist()
        spans = [(0, offs[n], offs[n + 1]) for n in range(p.N)]
    o = torch.zeros(p.B, p.T, p.H, p.V, dtype=dt, device=q.device)
    finals, zs = [], []
    for n, (b, s, e) in enumerate(spans):
        o_n, S_n, z_n = _recurrence(
            q[b, s:e],
            k[b, s:e],
            v[b, s:e],
            None if g is None else g[b, s:e],
            p.scale,
            S0[n],
            z0[n] if normalize else None,
        )
        o[b, s:e] = o_n
        finals.append(S_n)
        zs.append(z_n)
    o = o.to(v_dtype)
    if not output_final_state:
        return o, None
    S = torch.stack(finals)
    return o, ((S, torch.stack(zs)) if normalize else S)


def naive_linear_attn(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float | None = None,
    initial_state=None,
    output_final_state: bool = False,
    normalize: bool = False,
    cu_seqlens: torch.LongTensor | None = None,
):
    r"""Linear attention, one token at a time: S_t = S_{t-1} + k_t^T v_t ; o_t = scale * q_t S_t.

    With ``normalize=True`` also z_t = z_{t-1} + k_t and
    o_t = (scale * q_t S_t) / (scale * q_t . z_t + NORMALIZE_EPS).
    Arguments, shapes and return values are those of `swaa.kernels.linear_attn`; it computes in
    the state dtype (float32, or float64 for float64 inputs).
    """
    p = check_inputs(
        q,
        k,
        v,
        gated=False,
        scale=scale,
        initial_state=initial_state,
        output_final_state=output_final_state,
        normalize=normalize,
        cu_seqlens=cu_seqlens,
    )
    return _run(q, k, v, None, p, initial_state, output_final_state, normalize, cu_seqlens)


def naive_gla(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.LongTensor | None = None,
):
    r"""Gated linear attention, one token at a time (the recurrence of the GLA paper):
    S_t = diag(exp(g_t)) S_{t-1} + k_t^T v_t ; o_t = scale * q_t S_t.

    Arguments, shapes and return values are those of `swaa.kernels.gla`; it computes in the
    state dtype (float32, or float64 for float64 inputs).
    """
    p = check_inputs(
        q,
        k,
        v,
        g,
        gated=True,
        scale=scale,
        initial_state=initial_state,
        output_final_state=output_final_state,
        cu_seqlens=cu_seqlens,
    )
    return _run(q, k, v, g, p, initial_state, output_final_state, False, cu_seqlens)
