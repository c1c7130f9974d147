"""Gated linear attention (GLA) in torch: the chunked form and the single-token step, plus the
chunked machinery linear attention shares. The public function is `swaa.kernels.gla` (api.py).

Recurrence (per head): S_t = diag(exp(g_t)) S_{t-1} + k_t^T v_t ;  o_t = scale * q_t S_t.
"""

from __future__ import annotations

import torch

from swaa.kernels.checks import state_dtype_for

# tokens per chunk of the torch chunked form; a power of two (the intra-chunk part halves it).
# 32 beats 64 on CPU by ~10% (GLA, B=1, T=2048, H=8, K=V=64, one thread): half the intra-chunk
# matmul work for the same state-passing work
CHUNK_SIZE = 32
# elements per activation tensor in one segment of the CPU chunked form (see _run_segments)
SEGMENT_ELEMENTS = 1 << 17
# on CPU, a segment whose chunks all decay by at most e^-REFERENCE_SPAN_MAX (in every key channel)
# takes the plain chunked form with each chunk's start as the reference point: its factors e^G and
# e^-G then lie within e^+-30, far from float32's overflow and underflow (e^+-87), so every
# product is exact to a few ulps (the check costs no device sync there). Segments with stronger
# gates, and every segment off CPU, take the form built from products of gates (see _intra_chunk)
REFERENCE_SPAN_MAX = 30.0
_LOG2_E = 1.4426950408889634  # e^x = 2^(x log2(e))
# up to this half-block size the intra-chunk products are done elementwise: batched matmuls of
# thousands of 1x1 or 2x2 blocks cost more in dispatch than they save (measured on CPU)
_ELEMENTWISE_MAX_HALF = 2


def _blocks(x: torch.Tensor, dtype: torch.dtype, C: int) -> torch.Tensor:
    # [B, T, H, D] -> [B, H, N, C, D] in `dtype`, zero-padded to N * C tokens: the one copy in
    B, T, H, D = x.shape
    N = -(-T // C)
    out = x.new_empty(B, H, N * C, D, dtype=dtype)
    out[:, :, :T].copy_(x.transpose(1, 2))
    out[:, :, T:].zero_()
    return out.view(B, H, N, C, D)


def _chunk_size(T: int) -> int:
    # short inputs get the smallest power-of-two chunk that holds them
    return min(CHUNK_SIZE, 1 << max(T - 1, 0).bit_length())


def _run_segments(segment_fn, tensors, state):
    """Run a chunked kernel over the sequence in segments, carrying the state between them.

    On CPU the chunked form is memory-bound: one pass over a long sequence keeps a dozen
    activation-sized temporaries alive and spills the caches (measured at B=1, H=8, D=64, one
    thread: GLA took 706 ms at T=16k in one pass, 227 ms in 256-token segments). Segments of
    about SEGMENT_ELEMENTS elements per tensor keep the working set cached and the cost linear
    in T. On GPUs one segment.
    """
    q, v = tensors[0], tensors[2]
    B, T, H, K = q.shape
    if q.device.type == "cpu":
        C = _chunk_size(T)
        L = max(C, SEGMENT_ELEMENTS // (B * H * max(K, v.shape[-1])) // C * C)
    else:
        L = max(T, 1)
    out = v.new_empty(v.shape)
    for s in range(0, T, L):
        o, state = segment_fn(*(x[:, s : s + L] for x in tensors), state)
        n = min(L, T - s)
        out[:, s : s + n].copy_(o.flatten(2, 3)[:, :, :n].transpose(1, 2))
    return out, state


def _intra_chunk(q, k, v, a):
    """Causal attention inside each chunk with gated decays, using only products of gates <= 1.

    For i >= j, A_ij = sum_c q_ic k_jc D_ijc with D_ij = prod_{j < t <= i} a_t the decay from j to i
    (a = exp(g) <= 1). A single reference per chunk (q_i * D_0i and k_j / D_0j) would divide by
    numbers that underflow for strong gates. Instead the chunk is split in halves recursively:
    at the level of half-size h, the queries of each later half see the keys of the earlier half
    through the boundary between them, D_ij = QD_h(i) * KD_h(j), where QD_h(i) is the decay from
    the start of i's half to i and KD_h(j) the decay from j to the end of j's half. Both are
    products of gates, hence <= 1 (tiny values underflow to 0, as the true values do), and each
    level's QD/KD follows from the previous one by one multiplication per half: the only exp is
    a = exp(g). Pairs inside a half are left to the next level; i == j (decay 1) comes first.
    The matmul work adds up to one C x C product per chunk.

    Args:
        q, k (torch.Tensor): `[B, H, N, C, K]`, q already scaled.
        v (torch.Tensor): `[B, H, N, C, V]`.
        a (torch.Tensor): `[B, H, N, C, K]`, per-token decays exp(g).

    Returns:
        o (torch.Tensor): `[B, H, N, C, V]`, the intra-chunk part of the output.
        qd (torch.Tensor): `[B, H, N, C, K]`, decay from the chunk's start through token i.
        kd (torch.Tensor): `[B, H, N, C, K]`, decay from after token j to the chunk's end.
    """
    C = q.shape[-2]
    o = (q * k).sum(-1, keepdim=True) * v
    qd, kd = a, torch.ones_like(a)  # at h = 1: QD_1(i) = a_i, KD_1(j) = 1
    h = 1
    while h < C:
        split = (C // (2 * h), 2, h)
        qb, kb, vb, qdb, kdb = (x.unflatten(-2, split) for x in (q, k, v, qd, kd))
        qR = qb[..., 1, :, :] * qdb[..., 1, :, :]
        kL = kb[..., 0, :, :] * kdb[..., 0, :, :]
        vL = vb[..., 0, :, :]
        if h <= _ELEMENTWISE_MAX_HALF:
            A = (qR.unsqueeze(-2) * kL.unsqueeze(-3)).sum(-1)
            out = (A.unsqueeze(-1) * vL.unsqueeze(-3)).sum(-2)
        else:
            out = (qR @ kL.transpose(-1, -2)) @ vL
        o.unflatten(-2, split)[..., 1, :, :] += out
        # the next level's halves are this level's pairs: extend QD of the later half by the
        # earlier half's total decay, and KD of the earlier half by the later half's total
        # (one broadcast multiply each; the per-half factors are small)
        totals = qdb[..., -1:, :]  # [..., C / 2h, 2, 1, K]
        ones = torch.ones_like(totals[..., :1, :, :])
        qd = (qdb * torch.cat([ones, totals[..., :1, :, :]], -3)).flatten(-4, -2)
        kd = (kdb * torch.cat([totals[..., 1:, :, :], ones], -3)).flatten(-4, -2)
        h *= 2
    return o, qd, kd


def chunk_gla_torch(q, k, v, g, scale, initial_state=None, output_final_state=False):
    """Chunked parallel GLA in torch (no argument checks; use `gla` for the public API).

    Args:
        q, k, g (torch.Tensor): `[B, T, H, K]`.
        v (torch.Tensor): `[B, T, H, V]`.
        scale (float): multiplies q.
        initial_state (Optional[torch.Tensor]): `[B, H, K, V]` in the state dtype.
        output_final_state (bool): return the state after the last token.

    Returns:
        o `[B, T, H, V]` in v's dtype, and the final state `[B, H, K, V]` or None.
    """

    def segment(q, k, v, g, S):
        return _chunk_gla_segment(q, k, v, g, scale, S)

    o, S = _run_segments(segment, (q, k, v, g), initial_state)
    return o, (S if output_final_state else None)


def _blocks_or_view(x: torch.Tensor, dtype: torch.dtype, C: int) -> torch.Tensor:
    # [B, T, H, D] -> [B, H, N, C, D]: a strided view when T is a multiple of C (the elementwise
    # op that reads it makes the one copy, in the promoted dtype), else the padded copy of _blocks
    if x.shape[1] % C:
        return _blocks(x, dtype, C)
    return x.transpose(1, 2).unflatten(2, (x.shape[1] // C, C))


def _chunk_gla_segment(q, k, v, g, scale, initial_state):
    # one segment of chunk_gla_torch; returns (o [B, H, N, C, V] in the state dtype, final state)
    B, T, H, K = q.shape
    V = v.shape[-1]
    dt = state_dtype_for(q.dtype)
    C = _chunk_size(T)
    vc, gc = _blocks(v, dt, C), _blocks(g, dt, C)
    # padding tokens have g = 0 and k = 0: they neither decay nor add to the state
    G = gc.cumsum(-2)  # [B, H, N, C, K], log decay from the chunk's start through each token
    if q.device.type == "cpu" and G[..., -1, :].min() >= -REFERENCE_SPAN_MAX:
        # the chunk's start as the reference: qd = e^G in [e^-span, 1] and k / qd <= e^span
        # decay from the chunk's start through token i; exp2 runs ~3x faster than exp on CPU
        qd = G.mul_(_LOG2_E).exp2_()
        kg = _blocks(k, dt, C).div_(qd)  # k_j e^-G_j: (q_i qd_i) . kg_j = q_i k_j e^(G_i - G_j)
        # qd first: the product takes qd's contiguous layout, not the strided view's
        qg = qd * _blocks_or_view(q, dt, C)
        A = (qg @ kg.transpose(-1, -2)).tril_()  # [B, H, N, C, C]; tril_ ~15x faster than a mask
        o = A.flatten(0, 2) @ vc.flatten(0, 2)
        kd = kg * qd[..., -1:, :]  # k_j times the decay from after token j to the chunk's end
        # scale multiplies both parts of o inside the last product (no pass of its own)
        beta = alpha = scale
    else:
        qc = _blocks(q, dt, C).mul_(scale)
        kc = _blocks(k, dt, C)
        o, qd, kd = _intra_chunk(qc, kc, vc, gc.mul_(_LOG2_E).exp2_())  # a = e^g
        o = o.flatten(0, 2)
        qg, kd = qc * qd, kc * kd
        beta = alpha = 1
    # what each chunk adds to the state, decayed to the chunk's end (factors <= 1)
    U = kd.transpose(-1, -2) @ vc  # [B, H, N, K, V]
    decay = qd[..., -1:, :].transpose(-1, -2)  # [B, H, N, K, 1], the whole chunk's decay
    S0 = initial_state if initial_state is not None else q.new_zeros(B, H, K, V, dtype=dt)
    starts, S = _chunk_starts(U, decay, S0)
    # each query reads the state at its chunk's start, decayed to its own position
    o = o.baddbmm_(qg.flatten(0, 2), starts.flatten(0, 2), beta=beta, alpha=alpha)
    return o.view(B, H, -1, C, V), S


def _chunk_starts(U, decay, S):
    """The state at each chunk's start, S_{n+1} = decay_n * S_n + U_n, and the final state.

    U `[B, H, N, K, V]`, decay `[B, H, N, K, 1]`, S `[B, H, K, V]`. Without autograd the states
    are written in place into one buffer (out=); with it they are stacked: the same values.
    """
    N = U.shape[2]
    if torch.is_grad_enabled() and any(x.requires_grad for x in (U, decay, S)):
        starts = []
        for n in range(N):
            starts.append(S)
            S = torch.addcmul(U[:, :, n], decay[:, :, n], S)
        return torch.stack(starts, 2), S
    starts = U.new_empty(U.shape)
    starts[:, :, 0].copy_(S)
    for n in range(N - 1):
        torch.addcmul(U[:, :, n], decay[:, :, n], starts[:, :, n], out=starts[:, :, n + 1])
    return starts, torch.addcmul(U[:, :, N - 1], decay[:, :, N - 1], starts[:, :, N - 1])


def gla_step_torch(q, k, v, g, scale, initial_state=None, output_final_state=False):
    """One token of GLA: a state update and a read, in a few torch ops (no host syncs, so it can
    be captured in a CUDA graph). Same arguments as `chunk_gla_torch`, with T == 1."""
    dt = state_dtype_for(q.dtype)
    k1, v1 = k[:, 0].to(dt), v[:, 0].to(dt)  # [B, H, K], [B, H, V]
    kv = k1.unsqueeze(-1) * v1.unsqueeze(-2)
    if initial_state is None:
        S = kv
    else:
        S = torch.addcmul(kv, initial_state, g[:, 0].to(dt).exp().unsqueeze(-1))
    o = (q[:, 0].to(dt).unsqueeze(-2) @ S).squeeze(-2) * scale  # [B, H, V]
    return o.unsqueeze(1).to(v.dtype), (S if output_final_state else None)
