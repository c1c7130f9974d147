"""The family table: which pretrained architectures the converter knows, and how to reach their layers.

Adding a family is one entry in ``FAMILIES``: its ``model_type``, where transformers keeps its config and
causal-LM classes, and whether its ``config.layer_types`` may name converted layers ``"linear_attention"``.
Everything else (registration of the hybrid classes, save/load, the CLI) is derived from this table.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

__all__ = ["FAMILIES", "Family", "family_of", "supported_families"]


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
        linear_layer_types (bool):
            whether converted layers are written as ``"linear_attention"`` into ``config.layer_types``.
            Default: ``False``, and False for every family today: Qwen2/Qwen3 index their mask table by
            ``layer_types`` and raise KeyError on it; for Llama/Mistral, transformers >= 5.5 would then build
            its own ``LinearAttentionLayer`` for those layers, whose cache cannot answer ``get_seq_length``
            when every layer is linear (ValueError in generate). The swaa cache patch lets an ordinary
            ``DynamicLayer`` carry the state and the token count instead, so the model's own cache is
            right without it; the conversion itself is recorded in ``config.swaa_hybrid``.
    """

    model_type: str
    module: str
    config_class: str
    causal_lm_class: str
    linear_layer_types: bool = False

    @property
    def hybrid_model_type(self) -> str:
        """``model_type`` of the saved hybrid (``"swaa_" + model_type``), registered with the Auto classes."""
        return f"swaa_{self.model_type}"

    def load_config_class(self):
        return getattr(importlib.import_module(self.module), self.config_class)

    def load_causal_lm_class(self):
        return getattr(importlib.import_module(self.module), self.causal_lm_class)


# Llama covers SmolLM2, which is a Llama checkpoint. Mistral's sliding window stays on the softmax layers
# that are kept; converted layers are linear and have no window.
FAMILIES: dict[str, Family] = {
    f.model_type: f
    for f in (
        Family("qwen3", "transformers.models.qwen3", "Qwen3Config", "Qwen3ForCausalLM"),
        Family("qwen2", "transformers.models.qwen2", "Qwen2Config", "Qwen2ForCausalLM"),
        Family("llama", "transformers.models.llama", "LlamaConfig", "LlamaForCausalLM"),
        Family("mistral", "transformers.models.mistral", "MistralConfig", "MistralForCausalLM"),
    )
}


def supported_families() -> str:
    """Human-readable list of supported families, for error messages."""
    return ", ".join(f"{f.model_type} ({f.causal_lm_class})" for f in FAMILIES.values())


def family_of(model_type: str) -> Family:
    """Family of a source or hybrid ``model_type``.

    Raises:
        ValueError: the model type is not in the family table; the message lists the supported ones.
    """
    base = model_type[len("swaa_") :] if model_type.startswith("swaa_") else model_type
    if base not in FAMILIES:
        raise ValueError(
            f"model_type {model_type!r} cannot be converted to a hybrid; supported families: {supported_families()}"
        )
    return FAMILIES[base]
