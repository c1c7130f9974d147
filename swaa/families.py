"""The family table: which transformers architectures swaa knows, in one place.

Adding a family is one entry in ``FAMILIES``. An entry says where transformers keeps the family's config
and causal-LM classes (by name, so reading the table imports nothing) and how its attention is built
(biases, q/k norms), which is what a drop-in layer needs to take the replaced attention's weights key for
key. The layers, the converter, the registered hybrid classes and the CLI all read it from here.

Pure Python: no torch, no transformers.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

__all__ = ["DEFAULT_LAYOUT", "FAMILIES", "Family", "family_of", "layout_of", "supported_families"]

# "config" means the flag comes from the config's `attention_bias`
_FROM_CONFIG = "config"


@dataclass(frozen=True)
class Family:
    """One convertible architecture.

    Args:
        model_type (str):
            transformers' ``model_type`` of the source model, e.g. ``"qwen3"``.
        module (str):
            module holding the config and model classes, e.g. ``"transformers.models.qwen3"``.
        config_class (str):
            name of the config class in ``module``.
        causal_lm_class (str):
            name of the causal-LM model class in ``module``.
        qkv_bias, o_bias (bool | str):
            whether ``q/k/v_proj`` and ``o_proj`` have a bias; ``"config"``: as ``config.attention_bias`` says.
        qk_norm (bool):
            whether the attention normalises q and k per head (``q_norm``/``k_norm``, Qwen3).
    """

    model_type: str
    module: str
    config_class: str
    causal_lm_class: str
    qkv_bias: bool | str = _FROM_CONFIG
    o_bias: bool | str = _FROM_CONFIG
    qk_norm: bool = False

    @property
    def hybrid_model_type(self) -> str:
        """``model_type`` of a saved hybrid (``"swaa_" + model_type``), registered with the Auto classes."""
        return f"swaa_{self.model_type}"

    def load_config_class(self):
        return getattr(importlib.import_module(self.module), self.config_class)

    def load_causal_lm_class(self):
        return getattr(importlib.import_module(self.module), self.causal_lm_class)

    def biases(self, attention_bias: bool) -> tuple[bool, bool]:
        """``(qkv_bias, o_bias)`` of this family's attention for a config's ``attention_bias``."""
        qkv = attention_bias if self.qkv_bias == _FROM_CONFIG else self.qkv_bias
        o = attention_bias if self.o_bias == _FROM_CONFIG else self.o_bias
        return bool(qkv), bool(o)


# Llama covers SmolLM2, which is a Llama checkpoint. Mistral's sliding window stays on the softmax layers
# that are kept; converted layers are linear and have no window.
FAMILIES: dict[str, Family] = {
    f.model_type: f
    for f in (
        Family("qwen3", "transformers.models.qwen3", "Qwen3Config", "Qwen3ForCausalLM", qk_norm=True),
        Family("qwen2", "transformers.models.qwen2", "Qwen2Config", "Qwen2ForCausalLM", True, False),
        Family("llama", "transformers.models.llama", "LlamaConfig", "LlamaForCausalLM"),
        Family("mistral", "transformers.models.mistral", "MistralConfig", "MistralForCausalLM", False, False),
    )
}

# the attention layout assumed for a model type outside the table (a layer built from a config of
# another family, or from keywords alone): Llama's, which Mistral-like and most Llama-derived configs use
DEFAULT_LAYOUT = FAMILIES["llama"]


def supported_families() -> str:
    """Human-readable list of supported families, for error messages."""
    return ", ".join(f"{f.model_type} ({f.causal_lm_class})" for f in FAMILIES.values())


def family_of(model_type: str) -> Family:
    """Family of a source or hybrid (``swaa_<family>``) ``model_type``.

    Raises:
        ValueError: the model type is not in the family table; the message lists the supported ones.
    """
    base = str(model_type).removeprefix("swaa_")
    if base not in FAMILIES:
        raise ValueError(
            f"model_type {model_type!r} cannot be converted to a hybrid; supported families: {supported_families()}"
        )
    return FAMILIES[base]


def layout_of(model_type) -> Family:
    """The family whose attention layout a layer built for ``model_type`` follows (``DEFAULT_LAYOUT`` for
    a type outside the table, so a layer can be built from any Llama-like config)."""
    return FAMILIES.get(str(model_type or "").removeprefix("swaa_"), DEFAULT_LAYOUT)
