"""The body every drop-in layer shares, in the order a forward runs it: the projections named like the
replaced attention, q/k norms, gate, RoPE, feature maps, padding and packing, the kernel, the state in
the host's cache, output norm and gate.

A subclass declares its options as keyword-only arguments of its own ``__init__`` (documented there),
passes them on, and supplies the gate in log space (``_gate``, or None) and the kernel call (``_mix``).
"""

from __future__ import annotations

import inspect

import torch
import torch.nn as nn
import torch.nn.functional as F

from swaa import cache as swaa_cache
from swaa import kernels
from swaa.layers.feature_maps import FEATURE_MAPS, build_feature_map
from swaa.layers.host_inputs import check_state_batch, packed_cu_seqlens, pick_cache, tokens_to_keep
from swaa.layers.modules import RMSNorm, apply_rope
from swaa.layers.saving import guard_save_pretrained
from swaa.layers.shape import SHAPE_KEYWORDS, resolve_shape
from swaa.validation import check_bool, check_int, check_number

__all__ = ["RecurrentAttentionBase"]


def ensure_cache_patch() -> None:
    """Apply the swaa cache patch unless it is in place. Asked of ``swaa.cache`` at every forward with a
    cache (a flag read), so a model keeps working after someone unhacks and a new cache arrives; and at
    a layer's construction, so that a model traced before any eager forward (torch.export) finds it."""
    if swaa_cache.is_hacked():
        return
    if torch.compiler.is_compiling():
        raise RuntimeError(
            "the swaa cache patch is not applied and cannot be applied while torch.compile / torch.export "
            "traces the model: call swaa.hack_kv_cache_recurrent_state() before compiling or exporting"
        )
    swaa_cache.hack_kv_cache_recurrent_state()


class RecurrentAttentionBase(nn.Module):
    """Shared body of the drop-in layers; not used on its own.

    Args:
        config, layer_idx: as in the subclasses.
        shape (dict): the shape keywords (``swaa.layers.shape.SHAPE_KEYWORDS``) the subclass was given.
        feature_map, use_rope, scale, output_norm, output_gate, norm_eps, backend: the shared options,
            documented in each subclass.
    """

    # the names of a class's options: the keyword-only arguments of its __init__ that are not shape keywords
    option_names: tuple[str, ...] = ()

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        params = inspect.signature(cls.__init__).parameters.values()
        cls.option_names = tuple(
            p.name for p in params if p.kind is p.KEYWORD_ONLY and p.name not in SHAPE_KEYWORDS
        )

    def __init__(
        self,
        config,
        layer_idx,
        *,
        shape: dict,
        feature_map: str,
        use_rope: bool,
        scale: float | None,
        output_norm: bool,
        output_gate: bool,
        norm_eps: float | None,
        backend: str,
    ):
        super().__init__()
        check_int("layer_idx", layer_idx, minimum=0, allow_none=True)
        ensure_cache_patch()
        if backend not in kernels.BACKENDS:
            raise ValueError(f"backend must be one of {kernels.BACKENDS}, got {backend!r}")
        if feature_map not in FEATURE_MAPS:
            raise ValueError(f"feature_map must be one of {FEATURE_MAPS}, got {feature_map!r}")
        # options read from JSON (config.swaa_hybrid, `swaa --option`) arrive as whatever the text said
        for name, value in (
            ("use_rope", use_rope),
            ("output_norm", output_norm),
            ("output_gate", output_gate),
        ):
            check_bool(name, value)
        check_number("scale", scale, positive=True, allow_none=True)
        check_number("norm_eps", norm_eps, positive=True, allow_none=True)
        self.config = config
        self.layer_idx = layer_idx
        unknown = sorted(set(shape) - set(SHAPE_KEYWORDS))
        if unknown:
            raise TypeError(
                f"{type(self).__name__} got unknown option(s) {unknown}; its options: {list(self.option_names)}, "
                f"and the shape keywords {list(SHAPE_KEYWORDS)}"
            )
        self.shape = resolve_shape(config, **shape)
        # options are plain attributes: `layer.backend = "torch"` switches the kernels of a built layer
        self.feature_map, self.use_rope, self.scale = feature_map, use_rope, scale
        self.output_norm, self.output_gate, self.backend = output_norm, output_gate, backend
        self.norm_eps = self.shape.rms_norm_eps if norm_eps is None else norm_eps

        s = self.shape
        H, Hk, D, hidden = s.num_heads, s.num_kv_heads, s.head_dim, s.hidden_size
        self.hidden_size, self.num_heads, self.num_kv_heads, self.head_dim = hidden, H, Hk, D
        self.num_kv_groups = H // Hk
        # the same modules, names, shapes and biases as the attention being replaced
        self.q_proj = nn.Linear(hidden, H * D, bias=s.qkv_bias)
        self.k_proj = nn.Linear(hidden, Hk * D, bias=s.qkv_bias)
        self.v_proj = nn.Linear(hidden, Hk * D, bias=s.qkv_bias)
        self.o_proj = nn.Linear(H * D, hidden, bias=s.o_bias)
        if s.qk_norm:
            self.q_norm = RMSNorm(D, eps=s.rms_norm_eps)
            self.k_norm = RMSNorm(D, eps=s.rms_norm_eps)
        self.q_feature_map = build_feature_map(feature_map, H, D)
        self.k_feature_map = build_feature_map(feature_map, Hk, D)
        if output_norm:
            self.o_norm = RMSNorm(D, eps=self.norm_eps)
        if output_gate:
            self.g_proj = nn.Linear(hidden, H * D, bias=False)
        # save_pretrained refuses a model holding a layer its conversion record does not name (see there)
        guard_save_pretrained(RecurrentAttentionBase)

    def zero_state(self, batch_size: int, device=None):
        """The state of a fresh sequence, as this layer keeps it in a cache: zeros ``[B, H, K, V]`` (and
        ``z [B, H, K]`` when normalised), float32 (float64 for a float64 layer); K the key feature dim.
        What an exporter allocates before tracing (:func:`swaa.convert.export.exportable`)."""
        weight = self.q_proj.weight
        dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
        device = weight.device if device is None else device
        K = 2 * self.head_dim if self.feature_map == "hedgehog" else self.head_dim
        S = torch.zeros(batch_size, self.num_heads, K, self.head_dim, dtype=dtype, device=device)
        if getattr(self, "normalize", False):
            return S, torch.zeros(batch_size, self.num_heads, K, dtype=dtype, device=device)
        return S

    @property
    def options(self) -> dict:
        """The layer's options (shared and its own) with their current values."""
        return {name: getattr(self, name) for name in self.option_names}

    def reset_parameters(self):
        """Initialises the parameters a converted model does not copy from the softmax attention
        (gates, feature maps, output norm and gate); projections and ``q_norm``/``k_norm`` are left alone."""
        for module in (self.q_feature_map, self.k_feature_map):
            if hasattr(module, "reset_parameters"):
                module.reset_parameters()
        if hasattr(self, "o_norm"):
            nn.init.ones_(self.o_norm.weight)
        if hasattr(self, "g_proj"):
            # swish(g) with g ~ N(0, small): the gate starts near-constant, so training decides its use
            nn.init.normal_(self.g_proj.weight, std=self.hidden_size**-0.5)
        self._reset_gate()

    def _reset_gate(self):
        pass

    def _gate(self, hidden_states: torch.Tensor, k: torch.Tensor) -> torch.Tensor | None:
        """Log-space decay ``[B, T, Hk, Dk]`` (<= 0) from the input and the pre-RoPE keys, or None."""
        return None

    def _mix(self, q, k, v, g, initial_state, output_final_state, cu_seqlens=None):
        raise NotImplementedError

    def _heads(self, hidden_states: torch.Tensor):
        B, T, _ = hidden_states.shape
        q = self.q_proj(hidden_states).view(B, T, self.num_heads, self.head_dim)
        k = self.k_proj(hidden_states).view(B, T, self.num_kv_heads, self.head_dim)
        v = self.v_proj(hidden_states).view(B, T, self.num_kv_heads, self.head_dim)
        if self.shape.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        return q, k, v

    def _expand_kv(self, x: torch.Tensor | None) -> torch.Tensor | None:
        # kv head j serves query heads j*groups .. (j+1)*groups-1, as transformers' repeat_kv
        if x is None or self.num_kv_groups == 1:
            return x
        return x.repeat_interleave(self.num_kv_groups, dim=2)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        past_key_values=None,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        cache_position: torch.LongTensor | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, None]:
        """
        Args:
            hidden_states (torch.Tensor): ``[B, T, hidden_size]``.
            attention_mask (torch.Tensor, Optional): whatever the host model passes its attention
                modules (None, a 4D bool or additive float mask ``[B, 1, T, kv]``), or a 2D ``[B, T]``
                (or ``[B, past + T]``) padding mask with 1 for real tokens. Padding positions neither
                write into nor decay the state. Default: None.
            past_key_values (transformers.Cache, Optional): the model's cache; also accepted as
                ``cache=`` (transformers 5.x) or ``past_key_value=``. The layer keeps its recurrent state
                there (``state_update``), counting ``T`` new positions so ``get_seq_length()`` stays right.
                Without a cache nothing is read or written. Default: None.
            position_embeddings (tuple, Optional): ``(cos, sin)``, each ``[B, T, head_dim]``, from the host's
                rotary module; applied to q and k when ``use_rope`` is on. Default: None.
            cache_position (torch.LongTensor, Optional): ``[T]`` positions of the new tokens in the cache
                (transformers 4.x passes it); used to find the new tokens' columns in a 4D mask.
                Default: None.

        Returns:
            ``(attn_output [B, T, hidden_size], None)``: the second item stands for the attention
            weights a softmax attention returns; a linear layer has none.
        """
        # like the softmax attention it replaces, the layer follows the cache it is handed and ignores
        # `use_cache`: Llama's 4.57 decoder layer passes use_cache=False next to a live cache, and a
        # host model with use_cache=False passes no cache at all
        cache = pick_cache(past_key_values, kwargs)
        if hidden_states.dim() != 3 or hidden_states.shape[-1] != self.hidden_size:
            raise ValueError(
                f"hidden_states must be [B, T, {self.hidden_size}], got shape {tuple(hidden_states.shape)}"
            )
        B, T, _ = hidden_states.shape
        initial_state = self._cached_state(cache, B)

        if self._fuses_decode(hidden_states, initial_state):
            return self._fused_decode(
                hidden_states, attention_mask, cache, initial_state, position_embeddings, cache_position
            )

        q, k, v = self._heads(hidden_states)
        g = self._gate(hidden_states, k)
        if self.use_rope and position_embeddings is not None:
            q, k = apply_rope(q, k, *position_embeddings)
        q, k = self.q_feature_map(q), self.k_feature_map(k)

        keep = self._real_tokens(attention_mask, cache, cache_position, B, T)
        if keep is not None:
            # zero keys and values: a padding position adds nothing to the state; zero log-gate: no decay.
            # where() rather than a product so that garbage (even NaN) at padding cannot leak in
            keep = keep.to(k.device)[:, :, None, None]
            k = torch.where(keep, k, torch.zeros((), dtype=k.dtype, device=k.device))
            v = torch.where(keep, v, torch.zeros((), dtype=v.dtype, device=v.device))
            if g is not None:
                g = torch.where(keep, g, torch.zeros((), dtype=g.dtype, device=g.device))

        cu_seqlens = self._packed_sequences(kwargs, cache, B, T)
        k, v, g = self._expand_kv(k), self._expand_kv(v), self._expand_kv(g)
        if v.dtype != q.dtype:
            # softmax-type feature maps return float32 for half activations: the kernel runs in float32
            # and hands float32 gradients back to the maps
            v = v.to(q.dtype)
            g = g.to(q.dtype) if g is not None else None
        if self._steps_in_place(cache, initial_state, cu_seqlens, q, k, v, g):
            # a decode step on a static cache: the kernel writes the new state over the stored buffer, so
            # the step allocates no state and keeps its address (what a captured CUDA graph replays)
            normalize = getattr(self, "normalize", False)
            o = kernels.decode_step_(q, k, v, g, state=initial_state, scale=self.scale, normalize=normalize)
            final_state = initial_state
        elif cu_seqlens is None:
            o, final_state = self._mix(q, k, v, g, initial_state, output_final_state=cache is not None)
        else:
            # packed sequences: one row of B*T tokens, each sequence starting from a zero state
            flat = [x.reshape(1, B * T, *x.shape[2:]) if x is not None else None for x in (q, k, v, g)]
            o, final_state = self._mix(*flat, None, output_final_state=False, cu_seqlens=cu_seqlens)
            o = o.reshape(B, T, *o.shape[2:])
        if cache is not None:
            cache_kwargs = {"num_new_tokens": T}
            if final_state is not initial_state and not torch.compiler.is_compiling():
                # what `crop` needs to roll the state back into these tokens (a speculative decoding's
                # verification step); the cache keeps it only while it records the past
                cache_kwargs["rollback"] = (self._absorb, (k, v, g))
            cache.state_update(final_state, self.layer_idx, cache_kwargs)

        gate = self.g_proj(hidden_states).view_as(o) if self.output_gate else None
        o = self._output_norm_and_gate(o, gate)
        return self.o_proj(o.reshape(B, T, self.num_heads * self.head_dim).to(hidden_states.dtype)), None

    def _absorb(self, state, k, v, g):
        """The state after ``k, v, g`` (as this forward hands them to the kernel) starting from ``state``:
        what the cache recomputes when ``crop`` rolls it back. The state does not depend on the queries."""
        return self._mix(k, k, v, g, state, output_final_state=True)[1]

    def _cached_state(self, cache, batch_size: int):
        """The state this layer keeps in ``cache`` (None without a cache or before the first call),
        checked against the batch; applies the cache patch if someone removed it."""
        if cache is None:
            return None
        if self.layer_idx is None:
            raise ValueError(
                f"{type(self).__name__} needs layer_idx (an int) to keep its state in a cache, got None"
            )
        ensure_cache_patch()
        state = cache.get_recurrent_state(self.layer_idx)
        check_state_batch(state, batch_size)
        return state

    def _real_tokens(self, attention_mask, cache, cache_position, B: int, T: int) -> torch.Tensor | None:
        """``[B or 1, T]`` bool, True where a new position is a real token, from whatever mask the host
        passed (see :func:`tokens_to_keep`); None when nothing is masked."""
        if attention_mask is None:
            return None
        # where the new tokens sit among the mask's kv columns: after the tokens already seen
        if cache_position is not None:
            offset = cache_position[0]
        elif cache is not None:
            offset = cache.get_seq_length(self.layer_idx)
        else:
            offset = 0
        keep = tokens_to_keep(attention_mask, T, offset)
        if keep.shape[0] not in (1, B):
            raise ValueError(
                f"attention_mask must have batch size {B}, got shape {tuple(attention_mask.shape)}"
            )
        return keep

    def _fusable(self) -> bool:
        """Whether :func:`swaa.kernels.fused_decode_step` computes this layer's gate and normalisation
        (a subclass says; not the base)."""
        return False

    def _gate_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        """The fused step's gate logits ``[B, T, Hk, K]``: ``g = logsigmoid(logits) / normalizer``; None
        when the layer has no gate."""
        return None

    def _is_static(self, cache) -> bool:
        # a cache layer meant for compiled decode (a static cache's): its state buffer stays put
        layers = getattr(cache, "layers", None)
        return layers is not None and bool(getattr(layers[self.layer_idx], "is_compileable", False))

    def _fuses_decode(self, hidden_states: torch.Tensor, state) -> bool:
        """Whether this forward takes the fused decode step: one token on CUDA onto a state already in
        the cache, the default backend, the identity feature map, and no gradients (the fused kernel
        has no backward). The unfused path computes the same thing in a dozen more kernels."""
        return (
            hidden_states.shape[1] == 1
            and isinstance(state, torch.Tensor)
            and self.backend == "auto"
            and self.feature_map == "identity"
            and self._fusable()
            and not torch.is_grad_enabled()
            and kernels.fused_step_available(hidden_states)
        )

    def _fused_decode(self, hidden_states, attention_mask, cache, state, position_embeddings, cache_position):
        # the decode step with everything between the projections and the output norm in one kernel
        gate_logits = self._gate_logits(hidden_states)
        B = hidden_states.shape[0]
        H, Hk, D = self.num_heads, self.num_kv_heads, self.head_dim
        q = self.q_proj(hidden_states).view(B, 1, H, D)
        k = self.k_proj(hidden_states).view(B, 1, Hk, D)
        v = self.v_proj(hidden_states).view(B, 1, Hk, D)
        keep = self._real_tokens(attention_mask, cache, cache_position, B, 1)
        rope = self.use_rope and position_embeddings is not None
        cos, sin = position_embeddings if rope else (None, None)
        in_place = self._is_static(cache)
        qk_norm = self.shape.qk_norm
        o, new_state = kernels.fused_decode_step(
            q,
            k,
            v,
            gate_logits,
            state=state,
            scale=self.scale if self.scale is not None else D**-0.5,
            gate_normalizer=getattr(self, "gate_logit_normalizer", 1.0),
            q_norm_weight=self.q_norm.weight if qk_norm else None,
            k_norm_weight=self.k_norm.weight if qk_norm else None,
            norm_eps=self.shape.rms_norm_eps,
            cos=cos,
            sin=sin,
            keep=None if keep is None else keep[:, 0].expand(B),
            # on a static cache the state buffer is overwritten (its address is what a CUDA graph
            # replays); a DynamicCache's stored state may still be held by a caller: a new one
            state_out=None if in_place else torch.empty_like(state),
        )
        cache.state_update(new_state, self.layer_idx, {"num_new_tokens": 1})
        gate = self.g_proj(hidden_states).view_as(o) if self.output_gate else None
        o = self._output_norm_and_gate(o, gate)
        return self.o_proj(o.reshape(B, 1, H * D).to(hidden_states.dtype)), None

    def _steps_in_place(self, cache, state, cu_seqlens, *inputs) -> bool:
        """Whether this forward is a decode step that may update the cached state in place: one token, a
        state already in a cache layer meant for compiled decode (``is_compileable``: a static cache,
        whose state buffer stays put), the default backend, and no gradient wanted. On a DynamicCache the
        stored state is the tensor the previous step returned, which a caller may still hold: never
        overwritten there."""
        if state is None or cu_seqlens is not None or inputs[0].shape[1] != 1 or self.backend != "auto":
            return False
        if not self._is_static(cache):
            return False
        return not (torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in inputs))

    def _packed_sequences(self, kwargs: dict, cache, batch_size: int, q_len: int) -> torch.Tensor | None:
        """``cu_seqlens`` when several sequences are packed into the time axis, else None.

        Read as transformers' softmax layers read it, so a packed batch (``DataCollatorWithFlattening``)
        keeps its sequences apart here too: FlashAttention's ``cu_seq_lens_q`` keyword when the host
        passes it, else ``position_ids`` falling back to 0 when no cache is given (transformers builds its
        block-diagonal mask from them under the same condition; see :func:`packed_cu_seqlens`).
        """
        cu = kwargs.get("cu_seq_lens_q")
        if cu is not None:
            if cache is not None:
                raise ValueError("packed sequences (cu_seq_lens_q) cannot be used with a cache")
            if batch_size != 1:
                raise ValueError(f"cu_seq_lens_q needs batch size 1 (packed in one row), got {batch_size}")
            return cu.long()
        position_ids = kwargs.get("position_ids")
        if cache is not None or position_ids is None or q_len == 1 or torch.compiler.is_compiling():
            # (under torch.compile the value-dependent check would break the graph; pass cu_seq_lens_q)
            return None
        return packed_cu_seqlens(position_ids, batch_size, q_len)

    def _output_norm_and_gate(self, o: torch.Tensor, gate: torch.Tensor | None) -> torch.Tensor:
        """``o_norm(o) * swish(gate)`` per head (each part optional); o and gate ``[B, T, H, V]``."""
        if not self.output_norm:
            return o if gate is None else o * F.silu(gate)
        fused = (
            kernels.fla_rms_norm_gated()
            if (gate is not None and o.is_cuda and self.backend != "torch" and o.dtype in kernels.FLA_DTYPES)
            else None
        )
        if fused is None:
            # without a gate, o_norm is already one fused kernel on CUDA (RMSNorm.forward)
            o = self.o_norm(o)
            return o if gate is None else o * F.silu(gate)
        # norm and gate on CUDA: FLA's fused Triton kernel, one pass over o instead of three, same maths
        return fused(o, gate, self.o_norm.weight, None, "swish", eps=self.o_norm.eps)

    def extra_repr(self) -> str:
        s = self.shape
        opts = ", ".join(f"{k}={v!r}" for k, v in self.options.items())
        return (
            f"layer_idx={self.layer_idx}, hidden_size={s.hidden_size}, num_heads={s.num_heads}, "
            f"num_kv_heads={s.num_kv_heads}, head_dim={s.head_dim}, {opts}"
        )
