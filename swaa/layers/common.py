"""What LinearAttention and GatedLinearAttention share: reading the shape of the attention they replace,
the projections named like it, RoPE, recovering padding from the host model's mask, and keeping the
recurrent state in the model's own cache.

A subclass supplies three things: its extra options (``_OPTIONS``), the gate in log space (or None),
and the kernel call (``_mix``). Everything else, in the order a forward runs it, lives in
:class:`RecurrentAttentionBase`.
"""

from __future__ import annotations

import functools
import weakref
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from swaa.layers.feature_maps import FEATURE_MAPS, build_feature_map

BACKENDS = ("auto", "torch", "fla")

# How each supported family builds its attention projections: (q/k/v bias, o bias, q_norm/k_norm).
# "config" means the flag comes from `config.attention_bias`. Unknown families fall back to the
# Llama layout, which is what Mistral-like and most Llama-derived configs use.
_FAMILIES = {
    "llama": ("config", "config", False),
    "mistral": (False, False, False),
    "qwen2": (True, False, False),
    "qwen3": ("config", "config", True),
}


@dataclass
class AttentionShape:
    """The shape of the softmax attention a layer replaces (what the converter copies weights from)."""

    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    qkv_bias: bool
    o_bias: bool
    qk_norm: bool
    rms_norm_eps: float


def check_positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be a positive int, got {type(value).__name__} {value!r}")
    if value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def check_positive_number(name: str, value, allow_none: bool = False):
    """``value`` itself, or TypeError (not a number; bool counts as not) / ValueError (not > 0)."""
    if value is None and allow_none:
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        expected = "a positive number or None" if allow_none else "a positive number"
        raise TypeError(f"{name} must be {expected}, got {type(value).__name__} {value!r}")
    if not value > 0:
        raise ValueError(f"{name} must be a positive number, got {value!r}")
    return value


def resolve_shape(config, overrides: dict) -> AttentionShape:
    """Reads the attention shape from a transformers config, then applies keyword overrides.

    Consumes (pops) the shape keywords from ``overrides``: ``hidden_size``, ``num_heads``,
    ``num_kv_heads``, ``head_dim``, ``attention_bias``, ``qkv_bias``, ``o_bias``, ``qk_norm``,
    ``rms_norm_eps``. What is left in ``overrides`` belongs to the layer's own options.
    """
    if config is not None and hasattr(config, "get_text_config"):
        config = config.get_text_config()

    def from_config(attr, default=None):
        value = getattr(config, attr, None) if config is not None else None
        return default if value is None else value

    hidden_size = overrides.pop("hidden_size", from_config("hidden_size"))
    num_heads = overrides.pop("num_heads", from_config("num_attention_heads"))
    if hidden_size is None or num_heads is None:
        raise ValueError(
            "hidden_size and num_heads are required: pass a model config or the keywords "
            f"hidden_size=/num_heads=, got config={type(config).__name__}, hidden_size={hidden_size!r}, "
            f"num_heads={num_heads!r}"
        )
    hidden_size = check_positive_int("hidden_size", hidden_size)
    num_heads = check_positive_int("num_heads", num_heads)
    num_kv_heads = check_positive_int(
        "num_kv_heads", overrides.pop("num_kv_heads", from_config("num_key_value_heads", num_heads))
    )
    if num_heads % num_kv_heads:
        raise ValueError(
            f"num_heads must be a multiple of num_kv_heads, got num_heads={num_heads}, num_kv_heads={num_kv_heads}"
        )
    head_dim = overrides.pop("head_dim", from_config("head_dim"))
    if head_dim is None:
        if hidden_size % num_heads:
            raise ValueError(
                f"head_dim is not given and hidden_size={hidden_size} is not a multiple of num_heads={num_heads}"
            )
        head_dim = hidden_size // num_heads
    head_dim = check_positive_int("head_dim", head_dim)

    # a saved hybrid's config says "swaa_<family>" (swaa.convert registers those); its layout is the family's
    model_type = str(from_config("model_type", "")).removeprefix("swaa_")
    family = _FAMILIES.get(model_type, ("config", "config", False))
    attention_bias = bool(overrides.pop("attention_bias", from_config("attention_bias", False)))
    qkv_bias = attention_bias if family[0] == "config" else family[0]
    o_bias = attention_bias if family[1] == "config" else family[1]
    qkv_bias = bool(overrides.pop("qkv_bias", qkv_bias))
    o_bias = bool(overrides.pop("o_bias", o_bias))
    qk_norm = bool(overrides.pop("qk_norm", family[2]))
    rms_norm_eps = float(overrides.pop("rms_norm_eps", from_config("rms_norm_eps", 1e-6)))
    return AttentionShape(
        hidden_size, num_heads, num_kv_heads, head_dim, qkv_bias, o_bias, qk_norm, rms_norm_eps
    )


class RMSNorm(nn.Module):
    """RMSNorm over the last dim, computed in float32 like Qwen3's, with the same parameter name
    (``weight``), so ``q_norm``/``k_norm`` copy over one to one.

    Args:
        dim (int): size of the normalised (last) dim.
        eps (float): added to the mean square. Default: 1e-6.
    """

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_cuda and x.dtype == self.weight.dtype:
            # torch's fused kernel on CUDA: one launch instead of eight, which is what a decode step,
            # bound by launches, pays for. Float32 inside for half inputs, rounded once after the weight
            # (Qwen3's rounds before it): the two differ by at most a unit in the last place.
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
        dtype = x.dtype
        x = x.float() if dtype in (torch.float16, torch.bfloat16) else x
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


def apply_rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """Rotary embedding in transformers' convention (rotate-half), on FLA's layout.

    Args:
        q (torch.Tensor): ``[B, T, H, D]``.
        k (torch.Tensor): ``[B, T, Hk, D]``.
        cos, sin (torch.Tensor): ``[B, T, D]`` (or ``[1, T, D]``), as the host model's rotary module returns.
    """
    cos, sin = cos.unsqueeze(2).to(q.dtype), sin.unsqueeze(2).to(q.dtype)
    # rotate_half(x) * sin == roll(x, D/2) * [-sin_1, sin_2]: the sign goes on sin once for q and k, and
    # each tensor takes three kernels (mul, roll, addcmul) instead of five
    half = q.shape[-1] // 2
    sin = torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)
    return torch.addcmul(q * cos, q.roll(half, -1), sin), torch.addcmul(k * cos, k.roll(half, -1), sin)


def packed_cu_seqlens(position_ids: torch.Tensor, batch_size: int, q_len: int) -> torch.Tensor | None:
    """Boundaries of sequences packed along the time axis: a position that falls back to 0 starts a new
    sequence, as ``DataCollatorWithFlattening`` lays them out (and so does every row).

    Only a restart at 0 counts, not any step other than +1 as transformers' own mask check reads it: a
    vision-language model's text positions repeat over image tokens inside one sequence, and left padding
    (positions ``1, 1, 0, 1, 2``) ends with a restart at the first real token, which is harmless here since
    padded tokens are zeroed anyway.

    Args:
        position_ids (torch.Tensor): ``[B, T]`` or ``[1, T]``; anything else (the 3D positions of
            multimodal RoPE) is not read, and None is returned.
        batch_size, q_len (int): B and T of the hidden states.

    Returns:
        ``cu_seqlens`` ``[N + 1]`` (int64) over the ``B * T`` tokens flattened row after row, or None when
        each row holds one sequence. Reading the values costs one device sync, paid once per forward: the
        answer is kept for the next layer that gets the same ``position_ids`` tensor.
    """
    if (
        position_ids.dim() != 2
        or position_ids.shape[-1] != q_len
        or position_ids.shape[0] not in (1, batch_size)
    ):
        return None
    # inference tensors keep no version counter, so they are read every time
    key = None if position_ids.is_inference() else (position_ids._version, batch_size, q_len)
    seen = _LAST_PACKING.get("entry")  # one tuple, replaced whole: safe to read while another thread writes
    if key is not None and seen is not None and seen[0]() is position_ids and seen[1] == key:
        return seen[2]
    pos = position_ids.expand(batch_size, q_len)
    starts = torch.ones(batch_size, q_len, dtype=torch.bool, device=pos.device)
    starts[:, 1:] = pos[:, 1:] == 0
    value = None
    if bool(starts[:, 1:].any()):
        first = starts.flatten().nonzero().flatten()
        value = torch.cat([first, first.new_tensor([batch_size * q_len])])
    if key is not None:
        _LAST_PACKING["entry"] = (weakref.ref(position_ids), key, value)
    return value


# the last packing read: every layer of one forward gets the same position_ids tensor
_LAST_PACKING: dict = {}


def tokens_to_keep(attention_mask, q_len: int, offset) -> torch.Tensor | None:
    """Which of the ``q_len`` new positions are real tokens (True) rather than padding (False).

    transformers never hands an attention module the user's 2D mask; it builds one per layer type
    (see ``shared/TRANSFORMERS_NOTES.md``). What arrives, and how it is read:

    - ``None``: nothing is padded (SDPA drops the mask then, including single-token decode steps).
    - 4D ``[B, 1 or heads, q, kv]`` bool (SDPA; True = may attend) or float (eager; 0 = may attend,
      a large negative number = masked): a padding position cannot attend to itself, so the mask's
      diagonal for the new queries, column ``offset + i`` for query ``i``, says which are real.
    - 3D ``[B, q, kv]``: read as the 4D mask with its head axis already dropped.
    - 2D ``[B, kv]`` (flash-attention style, 1 = real; also what a user may pass to the layer
      directly): columns ``offset .. offset + q_len - 1``, or the whole mask when its width is ``q_len``.

    Args:
        attention_mask: one of the above.
        q_len (int): number of new positions T.
        offset (int or 0-dim tensor): kv index of the first new position (tokens already seen);
            clamped to the mask's width, so a mask that only covers the new tokens also works.

    Returns:
        ``[B, T]`` bool, or None when no mask was given.
    """
    if attention_mask is None:
        return None
    if not isinstance(attention_mask, torch.Tensor):
        raise TypeError(
            "attention_mask must be None, a 2D [B, T] padding mask or a 3D/4D [B, (1,) q, kv] mask tensor, "
            f"got {type(attention_mask).__name__} (flex-attention BlockMasks carry no padding we can read)"
        )
    kv_len = attention_mask.shape[-1]
    if attention_mask.dim() == 2:
        keep = attention_mask
    elif attention_mask.dim() in (3, 4):
        if attention_mask.shape[-2] != q_len:
            raise ValueError(
                f"attention_mask must have {q_len} query rows (the new tokens), got shape {tuple(attention_mask.shape)}"
            )
        mask = attention_mask if attention_mask.dim() == 3 else attention_mask[:, 0]
        keep = mask  # rows x columns; the diagonal is taken below
    else:
        raise ValueError(f"attention_mask must be 2D, 3D or 4D, got shape {tuple(attention_mask.shape)}")
    if kv_len < q_len:
        raise ValueError(
            f"attention_mask must cover the {q_len} new positions, got shape {tuple(attention_mask.shape)}"
        )

    # offset may be a tensor (cache_position[0]); keep it one so compiled graphs need no .item()
    offset = torch.as_tensor(offset, device=attention_mask.device).clamp(0, kv_len - q_len)
    cols = offset + torch.arange(q_len, device=attention_mask.device)
    if keep.dim() == 2:
        keep = keep[:, cols]
    else:
        keep = keep[:, torch.arange(q_len, device=attention_mask.device), cols]
    if keep.dtype == torch.bool:
        return keep
    if keep.is_floating_point() and attention_mask.dim() != 2:
        # additive mask: 0 where attending, finfo.min (or -inf) where masked
        return keep > torch.finfo(keep.dtype).min / 2
    return keep != 0


def _pick_cache(past_key_values, kwargs: dict):
    """The cache object, whatever the host calls it: ``past_key_values`` (transformers 4.5x),
    ``cache`` (5.2x decoder layers), or ``past_key_value`` (older families)."""
    for name in ("cache", "past_key_value"):
        other = kwargs.pop(name, None)
        if past_key_values is None:
            past_key_values = other
    return past_key_values


_FLA_NORM_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@functools.lru_cache(maxsize=1)
def _fla_gated_norm():
    """FLA's fused ``rms_norm_gated`` (norm, then times swish(gate)), or None when fla does not import
    (CPU, no triton)."""
    try:
        try:
            from fla.modules.norm.fused_norm_gate import rms_norm_gated
        except ImportError:  # fla < 0.5 kept it one level up
            from fla.modules.fused_norm_gate import rms_norm_gated
    except Exception:  # ImportError, or triton failing to initialise without a GPU driver
        return None
    return rms_norm_gated


_CACHE_PATCHED = False


def _ensure_cache_patch():
    # the layer applies the cache patch on first use with a cache, so a model with swapped layers
    # needs no extra call; the patch is idempotent, the flag only spares the import on every step
    global _CACHE_PATCHED
    if not _CACHE_PATCHED:
        from swaa.cache import hack_kv_cache_recurrent_state

        hack_kv_cache_recurrent_state()
        _CACHE_PATCHED = True


_FLAG_OPTIONS = ("use_rope", "output_norm", "output_gate", "normalize")

_SHARED_DEFAULTS = {
    "backend": "auto",
    "use_rope": True,
    "scale": None,
    "output_norm": False,
    "output_gate": False,
    "norm_eps": None,
}


class RecurrentAttentionBase(nn.Module):
    """Shared body of the drop-in layers; not used on its own.

    Subclasses set ``_OPTIONS`` (their option names and defaults, on top of the shared ones) and
    implement ``_gate`` and ``_mix``.
    """

    _OPTIONS: dict = {}

    def __init__(self, config=None, layer_idx: int | None = None, **overrides):
        super().__init__()
        overrides = dict(overrides)
        if layer_idx is not None and (isinstance(layer_idx, bool) or not isinstance(layer_idx, int)):
            raise TypeError(
                f"layer_idx must be a non-negative int or None, got {type(layer_idx).__name__} {layer_idx!r}"
            )
        if layer_idx is not None and layer_idx < 0:
            raise ValueError(f"layer_idx must be a non-negative int or None, got {layer_idx!r}")
        self.config = config
        self.layer_idx = layer_idx
        shape = resolve_shape(config, overrides)
        self.shape = shape
        options = {**_SHARED_DEFAULTS, **self._OPTIONS}
        unknown = sorted(set(overrides) - set(options))
        if unknown:
            raise TypeError(
                f"{type(self).__name__} got unknown option(s) {unknown}; known: {sorted(options)} and the "
                "shape keywords hidden_size, num_heads, num_kv_heads, head_dim, attention_bias, qkv_bias, "
                "o_bias, qk_norm, rms_norm_eps"
            )
        options.update(overrides)
        if options["backend"] not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {options['backend']!r}")
        if options.get("feature_map", "identity") not in FEATURE_MAPS:
            raise ValueError(f"feature_map must be one of {FEATURE_MAPS}, got {options['feature_map']!r}")
        # JSON-borne options (config.swaa_hybrid, `swaa --option`) arrive as whatever the text said:
        # "False" as a string would be truthy, so flags must be real bools
        for name in _FLAG_OPTIONS:
            if name in options and not isinstance(options[name], bool):
                raise TypeError(
                    f"{name} must be a bool, got {type(options[name]).__name__} {options[name]!r}"
                )
        check_positive_number("scale", options["scale"], allow_none=True)
        check_positive_number("norm_eps", options["norm_eps"], allow_none=True)
        if options["norm_eps"] is None:
            options["norm_eps"] = shape.rms_norm_eps
        # options live as plain attributes (layer.backend = "torch" switches the kernels of a built layer)
        self._option_names = tuple(options)
        for name, value in options.items():
            setattr(self, name, value)

        H, Hk, D, hidden = shape.num_heads, shape.num_kv_heads, shape.head_dim, shape.hidden_size
        self.hidden_size, self.num_heads, self.num_kv_heads, self.head_dim = hidden, H, Hk, D
        self.num_kv_groups = H // Hk
        # the same modules, names, shapes and biases as the attention being replaced
        self.q_proj = nn.Linear(hidden, H * D, bias=shape.qkv_bias)
        self.k_proj = nn.Linear(hidden, Hk * D, bias=shape.qkv_bias)
        self.v_proj = nn.Linear(hidden, Hk * D, bias=shape.qkv_bias)
        self.o_proj = nn.Linear(H * D, hidden, bias=shape.o_bias)
        if shape.qk_norm:
            self.q_norm = RMSNorm(D, eps=shape.rms_norm_eps)
            self.k_norm = RMSNorm(D, eps=shape.rms_norm_eps)
        self.q_feature_map = build_feature_map(options.get("feature_map", "identity"), H, D)
        self.k_feature_map = build_feature_map(options.get("feature_map", "identity"), Hk, D)
        if options["output_norm"]:
            self.o_norm = RMSNorm(D, eps=options["norm_eps"])
        if options["output_gate"]:
            self.g_proj = nn.Linear(hidden, H * D, bias=False)

    @property
    def options(self) -> dict:
        """The layer's options (shared and its own) with their current values."""
        return {name: getattr(self, name) for name in self._option_names}

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
        cache = _pick_cache(past_key_values, kwargs)
        if hidden_states.dim() != 3 or hidden_states.shape[-1] != self.hidden_size:
            raise ValueError(
                f"hidden_states must be [B, T, {self.hidden_size}], got shape {tuple(hidden_states.shape)}"
            )
        B, T, _ = hidden_states.shape
        if cache is not None:
            if self.layer_idx is None:
                raise ValueError(
                    f"{type(self).__name__} needs layer_idx (an int) to keep its state in a cache, got None"
                )
            _ensure_cache_patch()
            initial_state = cache.get_recurrent_state(self.layer_idx)
            _check_state_batch(initial_state, B)
        else:
            initial_state = None

        q, k, v = self._heads(hidden_states)
        g = self._gate(hidden_states, k)
        if self.use_rope and position_embeddings is not None:
            q, k = apply_rope(q, k, *position_embeddings)
        q, k = self.q_feature_map(q), self.k_feature_map(k)

        if attention_mask is not None:
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
        if cu_seqlens is None:
            o, final_state = self._mix(q, k, v, g, initial_state, output_final_state=cache is not None)
        else:
            # packed sequences: one row of B*T tokens, each sequence starting from a zero state
            flat = [x.reshape(1, B * T, *x.shape[2:]) if x is not None else None for x in (q, k, v, g)]
            o, final_state = self._mix(*flat, None, output_final_state=False, cu_seqlens=cu_seqlens)
            o = o.reshape(B, T, *o.shape[2:])
        if cache is not None:
            cache.state_update(final_state, self.layer_idx, {"num_new_tokens": T})

        gate = self.g_proj(hidden_states).view_as(o) if self.output_gate else None
        o = self._output_norm_and_gate(o, gate)
        return self.o_proj(o.reshape(B, T, self.num_heads * self.head_dim).to(hidden_states.dtype)), None

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
            _fla_gated_norm()
            if (gate is not None and o.is_cuda and self.backend != "torch" and o.dtype in _FLA_NORM_DTYPES)
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


def _check_state_batch(state, batch_size: int):
    if state is None:
        return
    first = state[0] if isinstance(state, tuple) else state
    if first.shape[0] != batch_size:
        raise ValueError(
            f"past_key_values holds a recurrent state for batch size {first.shape[0]}, but hidden_states has "
            f"batch size {batch_size}"
        )
