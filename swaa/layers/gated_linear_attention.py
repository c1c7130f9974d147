"""GatedLinearAttention (Yang et al., 2024): linear attention whose state decays per key dimension,
``S_t = diag(exp(g_t)) S_{t-1} + k_t^T v_t``, ``o_t = scale * q_t S_t``, with ``g_t <= 0`` computed from
the input; a drop-in replacement for a transformers softmax attention module."""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from swaa import kernels
from swaa.layers.base import RecurrentAttentionBase
from swaa.validation import check_int, check_number

GATES = ("low_rank", "from_keys")

# time constants (tokens) of the low-rank gate at init, log-spaced over each head's key dims
_INIT_MEMORY = (10.0, 1000.0)


class GatedLinearAttention(RecurrentAttentionBase):
    r"""Gated linear attention that replaces the attention module of a Qwen3, Qwen2, Llama or Mistral model.

    ``model.model.layers[i].self_attn = GatedLinearAttention(model.config, i)`` works in forward, training
    and ``generate()``; the projections ``q_proj``, ``k_proj``, ``v_proj``, ``o_proj`` (and
    ``q_norm``/``k_norm`` for Qwen3) have the names, shapes and biases of the replaced attention, and the
    recurrent state lives in the host's cache (the swaa cache patch is applied on use with a cache).

    Args:
        config (transformers.PretrainedConfig, Optional):
            The model config; reads ``hidden_size``, ``num_attention_heads``, ``num_key_value_heads``,
            ``head_dim`` (default ``hidden_size // num_attention_heads``), ``attention_bias``,
            ``rms_norm_eps`` and ``model_type`` (which decides biases and q/k norms). Default: None.
        layer_idx (int, Optional):
            Index of the layer in the model; needed to keep the state in a cache. Default: None.
        **shape:
            The shape keywords ``hidden_size``, ``num_heads``, ``num_kv_heads``, ``head_dim``,
            ``attention_bias``, ``qkv_bias``, ``o_bias``, ``qk_norm``, ``rms_norm_eps``: each overrides
            what the config says, or replaces it (see :func:`swaa.layers.shape.resolve_shape`).
        use_rope (bool, Optional):
            Rotate q and k by the host's ``position_embeddings`` before the feature map. Default: True:
            the pretrained q/k projections expect rotated products; rotation is skipped when the host
            passes no ``position_embeddings``.
        scale (float, Optional):
            Query scale handed to the kernel. Default: None (``K ** -0.5``, K the feature dim).
        norm_eps (float, Optional):
            Epsilon of ``o_norm``. Default: ``rms_norm_eps``.
        backend (str, Optional):
            ``auto`` (FLA on CUDA, torch elsewhere), ``torch`` or ``fla``; passed to the kernel.
            Default: ``auto``.
        gate (str, Optional):
            How the log-decay ``g [B, T, Hk, K]`` is made:

            - ``low_rank``: ``logsigmoid(gk_proj(x)) / gate_logit_normalizer`` with
              ``gk_proj = Linear(hidden, r, bias=False) -> Linear(r, Hk*K, bias=True)`` as in the GLA paper.
              Init: first weight ``N(0, hidden**-0.5)``, second ``N(0, 0.01 * r**-0.5)``, bias set so
              each key dim starts with a decay whose time constant is log-spaced from 10 to 1000 tokens
              (short and long memory side by side, nearly input-independent until trained).
            - ``from_keys``: no new parameters; one decay per kv head and token,
              ``logsigmoid(mean over the head dim of k_t) / gate_logit_normalizer``, from the (normed,
              pre-RoPE) key projection, broadcast over the key dims.

            Default: ``low_rank``.
        gate_low_rank_dim (int, Optional):
            ``r`` of the low-rank gate. Default: 16.
        gate_logit_normalizer (float, Optional):
            Divides the log-sigmoid; larger keeps decays closer to 1 (longer memory). Default: 16.
        feature_map (str, Optional):
            ``identity``, ``elu``, ``relu``, ``softmax`` or ``hedgehog`` (see ``swaa.layers.feature_maps``).
            Default: ``identity``: with RoPE the products ``q_t . k_s`` are exactly
            the pretrained attention logits (before softmax), which the gates then decay.
        output_norm (bool, Optional):
            RMSNorm over each head's output (``o_norm``, weight 1 at init). Default: True: the state is an
            unnormalised sum whose size depends on the decays; the norm keeps ``o_proj``'s input in range.
        output_gate (bool, Optional):
            Multiply by ``swish(g_proj(x))`` before ``o_proj``, as in the GLA paper. Default: False (a new
            gate would change a converted model before training).

    State in the cache: ``[B, H, K, V]``, float32 for half/float32 activations, float64 for float64.
    """

    def __init__(
        self,
        config=None,
        layer_idx: int | None = None,
        *,
        gate: str = "low_rank",
        gate_low_rank_dim: int = 16,
        gate_logit_normalizer: float = 16.0,
        feature_map: str = "identity",
        use_rope: bool = True,
        scale: float | None = None,
        output_norm: bool = True,
        output_gate: bool = False,
        norm_eps: float | None = None,
        backend: str = "auto",
        **shape,
    ):
        super().__init__(
            config,
            layer_idx,
            shape=shape,
            feature_map=feature_map,
            use_rope=use_rope,
            scale=scale,
            output_norm=output_norm,
            output_gate=output_gate,
            norm_eps=norm_eps,
            backend=backend,
        )
        if gate not in GATES:
            raise ValueError(f"gate must be one of {GATES}, got {gate!r}")
        self.gate = gate
        self.gate_logit_normalizer = check_number(
            "gate_logit_normalizer", gate_logit_normalizer, positive=True
        )
        self.gate_low_rank_dim = check_int("gate_low_rank_dim", gate_low_rank_dim, minimum=1)
        # key features per head after the feature map (hedgehog doubles them)
        self.key_feature_dim = 2 * self.head_dim if feature_map == "hedgehog" else self.head_dim
        if gate == "low_rank":
            r = self.gate_low_rank_dim
            self.gk_proj = nn.Sequential(
                nn.Linear(self.hidden_size, r, bias=False),
                nn.Linear(r, self.num_kv_heads * self.key_feature_dim, bias=True),
            )
        self.reset_parameters()

    def _reset_gate(self):
        if self.gate != "low_rank":
            return
        r = self.gate_low_rank_dim
        nn.init.normal_(self.gk_proj[0].weight, std=self.hidden_size**-0.5)
        nn.init.normal_(self.gk_proj[1].weight, std=0.01 * r**-0.5)
        # decay d = exp(-1/tau) needs logsigmoid(b) = N * log(d), i.e. b = logit(d ** N)
        lo, hi = _INIT_MEMORY
        tau = torch.logspace(math.log10(lo), math.log10(hi), self.key_feature_dim, dtype=torch.float64)
        p = torch.exp(-self.gate_logit_normalizer / tau)
        bias = torch.log(p) - torch.log1p(-p)
        with torch.no_grad():
            self.gk_proj[1].bias.copy_(bias.repeat(self.num_kv_heads))

    def _fusable(self):
        # the fused decode step computes the low-rank gate's log-sigmoid; the key-pooled gate is not fused
        return self.gate == "low_rank"

    def _gate_logits(self, hidden_states):
        B, T, _ = hidden_states.shape
        return self.gk_proj(hidden_states).view(B, T, self.num_kv_heads, self.key_feature_dim)

    def _gate(self, hidden_states, k):
        B, T, Hk, _ = k.shape
        if self.gate == "low_rank":
            logits = self.gk_proj(hidden_states).view(B, T, Hk, self.key_feature_dim)
        else:
            logits = k.mean(-1, keepdim=True).expand(B, T, Hk, self.key_feature_dim)
        # in the activation dtype, as FLA's layer does: the kernels accumulate gates in float32
        return F.logsigmoid(logits) / self.gate_logit_normalizer

    def _mix(self, q, k, v, g, initial_state, output_final_state, cu_seqlens=None):
        return kernels.gla(
            q,
            k,
            v,
            g,
            scale=self.scale,
            initial_state=initial_state,
            output_final_state=output_final_state,
            cu_seqlens=cu_seqlens,
            backend=self.backend,
        )
