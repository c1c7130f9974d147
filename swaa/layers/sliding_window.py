r"""Sliding-window softmax attention and (gated) linear attention in one layer, as LoLCATs and Liger
convert a pretrained model: softmax attention over the last ``W`` tokens, linear attention over every
token before them, one shared normaliser over both.

For a query ``t`` of one sequence (padding and other packed sequences are not part of it), with the
window ``w(t) = {t-W+1, ..., t}`` and the tokens before it ``l(t) = {s <= t-W}``:

    a_ts = scale * q_t . k_s                        (RoPE'd q, k; softmax scores, s in w(t))
    p_ts = exp(a_ts - logsumexp_{s' in w(t)} a_ts') (the window's softmax: sums to 1 over w(t))
    b_ts = phi(q_t) . (d_ts * phi(k_s))             (linear scores, s in l(t), >= 0)
    d_ts = prod_{r in l(t), r > s} exp(g_r)         (GLA's per-key-dim decay; 1 without a gate)
    o_t  = (sum_{w(t)} p_ts v_s + sum_{l(t)} b_ts v_s) / (1 + sum_{l(t)} b_ts)

Why this combination (one normaliser, the window's scores normalised by their own log-sum-exp):

- Within the first ``W`` tokens ``l(t)`` is empty and the layer *is* the softmax attention it replaces,
  so a converted layer starts exact on short contexts and every far token's mass is added on top.
- The window part is the output of an ordinary windowed softmax attention, with no need for its
  log-sum-exp or max (here SDPA over blocks of queries with a band mask, on CPU and CUDA alike; flash
  attention's ``window_size`` computes the same); the linear part is one (G)LA kernel call (FLA's on
  CUDA) whose values carry an extra column of ones, giving numerator and denominator together. The
  two meet in one elementwise step, and a decode step computes exactly the same quantities.
- It cannot overflow: window weights are <= 1 and the denominator is >= 1 (feature maps are
  non-negative). LoLCATs measures the linear scores against the window's largest score
  (``exp(a - max)``); measuring them against the window's total mass changes the window's weight by a
  factor between 1 and W, which the feature maps and gates learn in attention transfer anyway, and
  keeps the window part a plain attention call. Liger mixes two separately normalised outputs with
  fixed weights instead, which would scale the softmax attention down on short contexts.
- The gate decays a far token over the far tokens that came after it (``d_ts``), not over the window:
  the token leaving the window is folded into the state with its own gate, so the state is exactly the
  GLA state of the tokens before the window, and a decode step equals the full forward.

Decode keeps the last ``W`` tokens' keys and values next to the state in the same cache layer (see
``SlidingWindowGatedLinearAttention``'s "State in the cache"); the buffers have a fixed size ``W``
(empty slots are marked invalid), so a static cache keeps one static buffer per tensor and a compiled
decode step has fixed shapes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from swaa import kernels
from swaa.layers.gated_linear_attention import GatedLinearAttention
from swaa.layers.host_inputs import pick_cache
from swaa.layers.linear_attention import LinearAttention
from swaa.layers.modules import apply_rope
from swaa.validation import check_int

__all__ = [
    "WINDOW_FEATURE_MAPS",
    "SlidingWindowGatedLinearAttention",
    "SlidingWindowLinearAttention",
    "window_attention",
]

# feature maps whose scores are non-negative: the shared denominator then stays >= 1
WINDOW_FEATURE_MAPS = ("elu", "relu", "softmax", "hedgehog")

# queries per block of the window attention (at least W): each block reads its C + W keys
_MIN_BLOCK = 64


def window_attention(q, xk, xv, ok, window: int, scale: float, seg=None) -> torch.Tensor:
    """Softmax attention of each query over the ``window`` entries of ``xk`` ending at its own.

    The keys are the ``window`` entries before the queries followed by the queries' own: query ``t``
    sees entries ``t+1 .. t+window`` of ``xk`` (its own key is entry ``t + window``) that are ``ok`` and,
    with ``seg``, in its segment. Blocks of ``C >= window`` queries read ``C + window`` keys each, so
    the cost is linear in T (one SDPA call over all blocks).

    Args:
        q (torch.Tensor): ``[B, T, H, D]``, RoPE'd.
        xk, xv (torch.Tensor): ``[B, window + T, H, D]`` (kv heads already expanded), q's dtype.
        ok (torch.Tensor): ``[B, window + T]`` bool: a real token (not padding, not an empty slot).
        window (int): W >= 1.
        scale (float): multiplies ``q . k``.
        seg (torch.Tensor, Optional): ``[B, window + T]`` segment ids of packed sequences. Default: None.

    Returns:
        ``[B, T, H, D]`` in q's dtype: each row a softmax average of values (a query always sees its
        own key, so no row is empty; rows of padding queries are meaningless).
    """
    B, T, H, D = q.shape
    W = window
    C = min(T, max(W, _MIN_BLOCK))
    n = -(-T // C)
    extra = n * C - T
    if extra:
        q = F.pad(q, (0, 0, 0, 0, 0, extra))
        xk, xv = (F.pad(x, (0, 0, 0, 0, 0, extra)) for x in (xk, xv))
        ok = F.pad(ok, (0, extra), value=False)
        seg = None if seg is None else F.pad(seg, (0, extra), value=-1)
    L = C + W
    # block i of queries reads entries i*C .. i*C + L - 1: query c of it sees local keys c+1 .. c+W
    kb = xk.unfold(1, L, C).permute(0, 1, 2, 4, 3).reshape(B * n, H, L, D)  # [B*n, H, L, D]
    vb = xv.unfold(1, L, C).permute(0, 1, 2, 4, 3).reshape(B * n, H, L, D)
    qb = q.reshape(B * n, C, H, D).transpose(1, 2)  # [B*n, H, C, D]
    c = torch.arange(C, device=q.device)[:, None]
    j = torch.arange(L, device=q.device)[None, :]
    mask = ((j > c) & (j <= c + W))[None] & ok.unfold(1, L, C).reshape(B * n, 1, L)
    if seg is not None:
        own = seg[:, W:].reshape(B * n, C, 1)
        mask = mask & (seg.unfold(1, L, C).reshape(B * n, 1, L) == own)
    mask = mask | (j == c + W)[None]
    o = F.scaled_dot_product_attention(qb, kb, vb, attn_mask=mask[:, None], scale=scale)
    return o.transpose(1, 2).reshape(B, n * C, H, D)[:, :T]


def _zero_where_not(keep, x):
    # where() rather than a product, so that garbage (even NaN) where keep is False cannot leak
    if x is None:
        return None
    return torch.where(keep, x, torch.zeros((), dtype=x.dtype, device=x.device))


def _segments(cu_seqlens: torch.Tensor, length: int) -> torch.Tensor:
    # sequence index of each of the `length` packed tokens
    positions = torch.arange(length, device=cu_seqlens.device)
    return torch.searchsorted(cu_seqlens[1:].contiguous(), positions, right=True)


class _SlidingWindowMixin:
    """The forward of the sliding-window layers; the (gated) linear attention class it is mixed into
    supplies projections, feature maps, gate, output norm and gate."""

    gated: bool = False

    def _check_window_options(self, window, feature_map):
        if feature_map not in WINDOW_FEATURE_MAPS:
            raise ValueError(
                f"feature_map must be one of {WINDOW_FEATURE_MAPS} (non-negative scores share the "
                f"softmax window's normaliser), got {feature_map!r}"
            )
        return check_int("window", window, minimum=1)

    def zero_state(self, batch_size: int, device=None):
        """The state of a fresh sequence as the cache holds it: a zero linear state ``[B, H, K', V+1]``
        (float32, float64 for a float64 layer) and an empty window (zeros, every slot marked invalid)."""
        weight = self.q_proj.weight
        device = weight.device if device is None else device
        dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
        B, W, H, Hk, D = batch_size, self.window, self.num_heads, self.num_kv_heads, self.head_dim
        K = 2 * D if self.feature_map == "hedgehog" else D
        S = torch.zeros(B, H, K, D + 1, dtype=dtype, device=device)
        wk = torch.zeros(B, W, Hk, D, dtype=weight.dtype, device=device)
        ok = torch.zeros(B, W, dtype=torch.bool, device=device)
        if self.gated:
            return S, wk, wk.clone(), torch.zeros(B, W, Hk, K, dtype=weight.dtype, device=device), ok
        return S, wk, wk.clone(), ok

    def _state_parts(self, state, B: int):
        """``(S, wk, wv, wg, wok)`` of a cached state (``wg`` None without a gate), checked against this
        layer's layout."""
        n = 5 if self.gated else 4
        W, Hk, D = self.window, self.num_kv_heads, self.head_dim
        if not isinstance(state, tuple) or len(state) != n or tuple(state[1].shape) != (B, W, Hk, D):
            got = (
                f"a tuple of {len(state)} with window keys {tuple(state[1].shape)}"
                if isinstance(state, tuple) and len(state) > 1
                else type(state).__name__
            )
            raise ValueError(
                f"past_key_values holds a state for layer {self.layer_idx} that is not a window of W={W} "
                f"tokens of {type(self).__name__} (a tuple of {n} with window keys {(B, W, Hk, D)}), got {got}"
            )
        if self.gated:
            return state
        S, wk, wv, wok = state
        return S, wk, wv, None, wok

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        past_key_values=None,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        cache_position: torch.LongTensor | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, None]:
        """Arguments and return value as ``RecurrentAttentionBase.forward``; the state in the cache is
        the tuple described in the class docstring."""
        cache = pick_cache(past_key_values, kwargs)
        if hidden_states.dim() != 3 or hidden_states.shape[-1] != self.hidden_size:
            raise ValueError(
                f"hidden_states must be [B, T, {self.hidden_size}], got shape {tuple(hidden_states.shape)}"
            )
        B, T, _ = hidden_states.shape
        W, Hk, D = self.window, self.num_kv_heads, self.head_dim
        state = self._cached_state(cache, B)
        if state is not None:
            state = self._state_parts(state, B)

        q, k, v = self._heads(hidden_states)
        g = self._gate(hidden_states, k) if self.gated else None
        if self.use_rope and position_embeddings is not None:
            q, k = apply_rope(q, k, *position_embeddings)

        keep = self._real_tokens(attention_mask, cache, cache_position, B, T)
        if keep is not None:
            keep = keep.to(k.device).expand(B, T)
            # padding enters the window as zeros marked invalid (garbage, even NaN, cannot leak)
            k, v, g = (_zero_where_not(keep[:, :, None, None], x) for x in (k, v, g))
        else:
            keep = torch.ones(B, T, dtype=torch.bool, device=k.device)

        cu_seqlens = self._packed_sequences(kwargs, cache, B, T)
        seg = None
        if cu_seqlens is not None:
            # one row of B*T tokens; the window and the linear part stay inside each sequence
            q, k, v = (x.reshape(1, B * T, *x.shape[2:]) for x in (q, k, v))
            g = None if g is None else g.reshape(1, B * T, *g.shape[2:])
            keep = keep.reshape(1, B * T)
            seg = _segments(cu_seqlens, B * T)[None]
            seg = torch.cat([seg.new_full((1, W), -1), seg], 1)
        rows, steps = q.shape[0], q.shape[1]

        if state is None:
            S0 = None
            wk, wv = k.new_zeros(rows, W, Hk, D), v.new_zeros(rows, W, Hk, D)
            wg = None if g is None else g.new_zeros(rows, W, Hk, g.shape[-1])
            wok = keep.new_zeros(rows, W)
        else:
            S0, wk, wv, wg, wok = state
        # the window before these tokens, then these tokens: entry t + W is token t
        xk, xv, xok = torch.cat([wk, k], 1), torch.cat([wv, v], 1), torch.cat([wok, keep], 1)
        xg = None if g is None else torch.cat([wg, g], 1)

        o_win = window_attention(
            q,
            self._expand_kv(xk),
            self._expand_kv(xv),
            xok,
            W,
            self.head_dim**-0.5 if self.scale is None else self.scale,
            seg,
        )

        # as token t arrives, entry t leaves the window and is folded into the state (with its gate);
        # query t then reads the state of every token up to entry t. Empty slots, padding and other
        # sequences' tokens fold in as zeros with a zero log-gate: no change at all
        fold = xok[:, :steps]
        if seg is not None:
            fold = fold & (seg[:, :steps] == seg[:, W:])
        fold = fold[:, :, None, None]
        fq, fk = self.q_feature_map(q), self.k_feature_map(xk[:, :steps])
        fk = _zero_where_not(fold, fk)
        fv = _zero_where_not(fold, xv[:, :steps]).to(fq.dtype)
        # a column of ones: the kernel's last output column is the normaliser phi(q_t) . z_t
        fv = torch.cat([fv, fv.new_ones(*fv.shape[:-1], 1)], -1)
        fg = None if xg is None else _zero_where_not(fold, xg[:, :steps]).to(fq.dtype)
        fk, fv, fg = self._expand_kv(fk), self._expand_kv(fv), self._expand_kv(fg)
        lin, S = self._linear_part(fq, fk, fv, fg, S0, cache is not None, cu_seqlens)

        # combined in the state's precision (float32, float64 for float64 inputs)
        dt = torch.float64 if lin.dtype == torch.float64 else torch.float32
        num, den = lin[..., :D].to(dt), lin[..., D:].to(dt)
        o = ((o_win.to(dt) + num) / (1 + den)).to(lin.dtype)
        if cu_seqlens is not None:
            o = o.reshape(B, T, *o.shape[2:])
        if cache is not None:
            kept = (xk[:, steps:], xv[:, steps:]) + (() if xg is None else (xg[:, steps:],))
            cache.state_update((S, *kept, xok[:, steps:]), self.layer_idx, {"num_new_tokens": T})

        gate = self.g_proj(hidden_states).view_as(o) if self.output_gate else None
        o = self._output_norm_and_gate(o, gate)
        return self.o_proj(o.reshape(B, T, self.num_heads * self.head_dim).to(hidden_states.dtype)), None

    def _linear_part(self, q, k, v, g, initial_state, output_final_state, cu_seqlens):
        # the feature-map products unscaled (scale 1), as LoLCATs scores its linear part
        if self.gated:
            return kernels.gla(
                q,
                k,
                v,
                g,
                scale=1.0,
                initial_state=initial_state,
                output_final_state=output_final_state,
                cu_seqlens=cu_seqlens,
                backend=self.backend,
            )
        return kernels.linear_attn(
            q,
            k,
            v,
            scale=1.0,
            initial_state=initial_state,
            output_final_state=output_final_state,
            cu_seqlens=cu_seqlens,
            backend=self.backend,
        )


class SlidingWindowGatedLinearAttention(_SlidingWindowMixin, GatedLinearAttention):
    r"""Softmax attention over the last ``window`` tokens plus gated linear attention over everything
    before them, one shared normaliser (see ``swaa.layers.sliding_window``); a drop-in replacement for
    the attention module of a Qwen3, Qwen2, Llama or Mistral model (conversion kind ``swa_gla``).

    Args:
        config, layer_idx, **shape, use_rope, norm_eps, backend, gate, gate_low_rank_dim,
        gate_logit_normalizer, output_gate:
            As in :class:`GatedLinearAttention` (the gate decays the linear part only).
        window (int, Optional):
            W, the tokens each query attends with softmax (its own included). Default: 64 (LoLCATs').
        scale (float, Optional):
            Scale of the window's softmax scores. Default: None (``head_dim ** -0.5``, the replaced
            attention's). The linear part's scores ``phi(q) . phi(k)`` are not scaled.
        feature_map (str, Optional):
            ``elu``, ``relu``, ``softmax`` or ``hedgehog``: non-negative, so the shared denominator stays
            >= 1. Default: ``softmax`` (no new parameters, positive).
        output_norm (bool, Optional):
            RMSNorm over each head's output. Default: False: the output is already a weighted average of
            values, the input ``o_proj`` was trained on.

    State in the cache: the tuple ``(S, keys, values, log_gates, ok)``, every tensor batch-first (so beam
    search, batch selection, offload and static buffers treat it as any state): ``S [B, H, K', V+1]``
    the GLA state of the tokens before the window (its last column is the normaliser's key sum; float32,
    float64 for float64 inputs; ``K'`` the feature dim), the window's RoPE'd keys and values
    ``[B, W, Hk, D]`` and log-gates ``[B, W, Hk, K']`` (oldest first, activation dtype), and
    ``ok [B, W]`` bool: the slot holds a real token (empty slots at the start, and padding, do not).
    ``get_seq_length()`` counts every token seen.
    """

    gated = True

    def __init__(
        self,
        config=None,
        layer_idx: int | None = None,
        *,
        window: int = 64,
        gate: str = "low_rank",
        gate_low_rank_dim: int = 16,
        gate_logit_normalizer: float = 16.0,
        feature_map: str = "softmax",
        use_rope: bool = True,
        scale: float | None = None,
        output_norm: bool = False,
        output_gate: bool = False,
        norm_eps: float | None = None,
        backend: str = "auto",
        **shape,
    ):
        window = self._check_window_options(window, feature_map)
        super().__init__(
            config,
            layer_idx,
            gate=gate,
            gate_low_rank_dim=gate_low_rank_dim,
            gate_logit_normalizer=gate_logit_normalizer,
            feature_map=feature_map,
            use_rope=use_rope,
            scale=scale,
            output_norm=output_norm,
            output_gate=output_gate,
            norm_eps=norm_eps,
            backend=backend,
            **shape,
        )
        self.window = window


class SlidingWindowLinearAttention(_SlidingWindowMixin, LinearAttention):
    r"""Softmax attention over the last ``window`` tokens plus linear attention over everything before
    them, one shared normaliser (see ``swaa.layers.sliding_window``); a drop-in replacement for the
    attention module of a Qwen3, Qwen2, Llama or Mistral model (conversion kind ``swa_linear``).

    Args:
        config, layer_idx, **shape, use_rope, norm_eps, backend, output_gate:
            As in :class:`LinearAttention` (there is no ``normalize``: the shared normaliser is the
            normalisation).
        window (int, Optional):
            W, the tokens each query attends with softmax (its own included). Default: 64 (LoLCATs').
        scale (float, Optional):
            Scale of the window's softmax scores. Default: None (``head_dim ** -0.5``, the replaced
            attention's). The linear part's scores ``phi(q) . phi(k)`` are not scaled.
        feature_map (str, Optional):
            ``elu``, ``relu``, ``softmax`` or ``hedgehog``: non-negative, so the shared denominator stays
            >= 1. Default: ``softmax``.
        output_norm (bool, Optional):
            RMSNorm over each head's output. Default: False.

    State in the cache: the tuple ``(S, keys, values, ok)``, as for
    :class:`SlidingWindowGatedLinearAttention` without the log-gates: ``S [B, H, K', V+1]`` (float32,
    float64 for float64 inputs), keys and values ``[B, W, Hk, D]``, ``ok [B, W]`` bool.
    """

    def __init__(
        self,
        config=None,
        layer_idx: int | None = None,
        *,
        window: int = 64,
        feature_map: str = "softmax",
        use_rope: bool = True,
        scale: float | None = None,
        output_norm: bool = False,
        output_gate: bool = False,
        norm_eps: float | None = None,
        backend: str = "auto",
        **shape,
    ):
        window = self._check_window_options(window, feature_map)
        super().__init__(
            config,
            layer_idx,
            feature_map=feature_map,
            normalize=False,
            use_rope=use_rope,
            scale=scale,
            output_norm=output_norm,
            output_gate=output_gate,
            norm_eps=norm_eps,
            backend=backend,
            **shape,
        )
        self.window = window
