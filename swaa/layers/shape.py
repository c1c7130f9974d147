"""The shape of the softmax attention a layer replaces, read from a transformers config and the family
table, with keyword overrides: what the projections of a drop-in layer must look like to take the
replaced attention's weights key for key."""

from __future__ import annotations

from dataclasses import dataclass

from swaa.families import layout_of
from swaa.validation import check_int

__all__ = ["SHAPE_KEYWORDS", "AttentionShape", "resolve_shape"]

# the keywords every layer takes to override (or replace) what the config says
SHAPE_KEYWORDS = (
    "hidden_size",
    "num_heads",
    "num_kv_heads",
    "head_dim",
    "attention_bias",
    "qkv_bias",
    "o_bias",
    "qk_norm",
    "rms_norm_eps",
)


@dataclass(frozen=True)
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


def resolve_shape(
    config=None,
    *,
    hidden_size: int | None = None,
    num_heads: int | None = None,
    num_kv_heads: int | None = None,
    head_dim: int | None = None,
    attention_bias: bool | None = None,
    qkv_bias: bool | None = None,
    o_bias: bool | None = None,
    qk_norm: bool | None = None,
    rms_norm_eps: float | None = None,
) -> AttentionShape:
    """The attention shape a config describes, with each keyword that is not None taking precedence.

    Args:
        config (transformers.PretrainedConfig, Optional): reads ``hidden_size``, ``num_attention_heads``,
            ``num_key_value_heads`` (default: the head count), ``head_dim`` (default
            ``hidden_size // num_attention_heads``), ``attention_bias``, ``rms_norm_eps`` (default 1e-6)
            and ``model_type``, which picks the family's bias and q/k-norm layout (``swaa.families``).
        hidden_size, num_heads, num_kv_heads, head_dim (int, Optional): shape overrides.
        attention_bias (bool, Optional): overrides ``config.attention_bias``.
        qkv_bias, o_bias, qk_norm (bool, Optional): override the family's layout.
        rms_norm_eps (float, Optional): epsilon of ``q_norm``/``k_norm``.

    Raises:
        ValueError: no hidden size or head count from either source, or sizes that do not divide.
        TypeError: a size that is not an int.
    """
    if config is not None and hasattr(config, "get_text_config"):
        config = config.get_text_config()

    def pick(given, attr, default=None):
        if given is not None:
            return given
        value = getattr(config, attr, None) if config is not None else None
        return default if value is None else value

    hidden_size = pick(hidden_size, "hidden_size")
    num_heads = pick(num_heads, "num_attention_heads")
    if hidden_size is None or num_heads is None:
        raise ValueError(
            "hidden_size and num_heads are required: pass a model config or the keywords "
            f"hidden_size=/num_heads=, got config={type(config).__name__}, hidden_size={hidden_size!r}, "
            f"num_heads={num_heads!r}"
        )
    hidden_size = check_int("hidden_size", hidden_size, minimum=1)
    num_heads = check_int("num_heads", num_heads, minimum=1)
    num_kv_heads = check_int("num_kv_heads", pick(num_kv_heads, "num_key_value_heads", num_heads), minimum=1)
    if num_heads % num_kv_heads:
        raise ValueError(
            f"num_heads must be a multiple of num_kv_heads, got num_heads={num_heads}, num_kv_heads={num_kv_heads}"
        )
    head_dim = pick(head_dim, "head_dim")
    if head_dim is None:
        if hidden_size % num_heads:
            raise ValueError(
                f"head_dim is not given and hidden_size={hidden_size} is not a multiple of num_heads={num_heads}"
            )
        head_dim = hidden_size // num_heads
    head_dim = check_int("head_dim", head_dim, minimum=1)

    # a saved hybrid's config says "swaa_<family>"; its layout is the family's
    layout = layout_of(getattr(config, "model_type", None) if config is not None else None)
    family_qkv_bias, family_o_bias = layout.biases(bool(pick(attention_bias, "attention_bias", False)))
    return AttentionShape(
        hidden_size=hidden_size,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        qkv_bias=bool(family_qkv_bias if qkv_bias is None else qkv_bias),
        o_bias=bool(family_o_bias if o_bias is None else o_bias),
        qk_norm=bool(layout.qk_norm if qk_norm is None else qk_norm),
        rms_norm_eps=float(pick(rms_norm_eps, "rms_norm_eps", 1e-6)),
    )
