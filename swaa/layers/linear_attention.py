"""LinearAttention: a drop-in replacement for a transformers softmax attention module whose
state is ``S_t = S_{t-1} + phi(k_t)^T v_t`` and output ``o_t = phi(q_t) S_t`` (optionally divided by
``phi(q_t) . z_t``, ``z_t = sum phi(k_s)``), kept in the model's cache."""

from __future__ import annotations

from swaa import kernels
from swaa.layers.base import RecurrentAttentionBase
from swaa.validation import check_bool


class LinearAttention(RecurrentAttentionBase):
    r"""Linear attention that replaces the attention module of a Qwen3, Qwen2, Llama or Mistral model.

    ``model.model.layers[i].self_attn = LinearAttention(model.config, i)`` works in forward, training and
    ``generate()``: the layer takes the call those families' decoder layers make and keeps its
    recurrent state in their cache (applying the swaa cache patch on first use with a cache).

    Projections ``q_proj``, ``k_proj``, ``v_proj``, ``o_proj`` (and ``q_norm``/``k_norm`` for Qwen3)
    have the names, shapes and biases of the replaced attention, so its ``state_dict`` loads key for
    key; grouped KV heads are expanded to the query heads inside the layer.

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
        feature_map (str, Optional):
            ``identity``, ``elu``, ``relu``, ``softmax`` or ``hedgehog`` (see ``swaa.layers.feature_maps``).
            Default: ``softmax``: positive without new parameters, and exp-shaped like the kernel of the
            softmax attention being replaced, so a converted layer starts closest to it.
        normalize (bool, Optional):
            Divide by ``phi(q_t) . z_t``. Default: True: outputs stay weighted averages of values, the
            input ``o_proj`` was trained on; without it the output grows with the sequence length.
        use_rope (bool, Optional):
            Rotate q and k by the host's ``position_embeddings`` before the feature map. Default: True:
            the pretrained q/k projections expect rotated products; rotation is skipped when the host
            passes no ``position_embeddings``.
        scale (float, Optional):
            Query scale handed to the kernel. Default: None (``K ** -0.5``, K the feature dim).
        output_norm (bool, Optional):
            RMSNorm over each head's output (``o_norm``, weight 1 at init). Default: False (normalised
            outputs are already value-sized).
        output_gate (bool, Optional):
            Multiply by ``swish(g_proj(x))`` before ``o_proj`` (``g_proj`` ``[hidden, H*D]``, no bias,
            normal init). Default: False (a new gate would change a converted model before training).
        norm_eps (float, Optional):
            Epsilon of ``o_norm``. Default: ``rms_norm_eps``.
        backend (str, Optional):
            ``auto`` (FLA on CUDA, torch elsewhere), ``torch`` or ``fla``; passed to the kernel.
            Default: ``auto``.

    State in the cache: ``(kv_state [B, H, K, V], z_state [B, H, K])`` with ``normalize``, else
    ``kv_state``; float32 for half/float32 activations, float64 for float64.
    """

    def __init__(
        self,
        config=None,
        layer_idx: int | None = None,
        *,
        feature_map: str = "softmax",
        normalize: bool = True,
        use_rope: bool = True,
        scale: float | None = None,
        output_norm: bool = False,
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
        self.normalize = check_bool("normalize", normalize)

    def _fusable(self):
        # the fused decode step has no normaliser (a running key sum would need its own reduction)
        return not self.normalize

    def _mix(self, q, k, v, g, initial_state, output_final_state, cu_seqlens=None):
        return kernels.linear_attn(
            q,
            k,
            v,
            scale=self.scale,
            initial_state=initial_state,
            output_final_state=output_final_state,
            normalize=self.normalize,
            cu_seqlens=cu_seqlens,
            backend=self.backend,
        )
