"""Building the linear modules a record names and putting them in place of the softmax attention.

Used by :func:`swaa.convert.convert_to_hybrid` (copying the source weights) and by the registered hybrid
classes when a saved hybrid is rebuilt (its weights come from the checkpoint).
"""

from __future__ import annotations

import torch
from torch import nn

import swaa.layers
from swaa.convert.record import KINDS, check_kind

__all__ = ["apply_record", "build_linear_layers", "check_layer_options", "decoder_layers", "layer_class"]


def layer_class(kind: str) -> type:
    """The ``swaa.layers`` class of a conversion ``kind``."""
    return getattr(swaa.layers, KINDS[check_kind(kind)])


def decoder_layers(model) -> nn.ModuleList:
    """The decoder blocks: ``.layers`` of the family's base model (``model.model`` of a causal LM or a
    classification head, the model itself for the bare ``*Model``, ``.transformer`` of some QA heads)."""
    return model.base_model.layers


def _copy_weights(source: nn.Module, target: nn.Module, layer_idx: int) -> None:
    # every source tensor must land in a tensor of the same name and shape; nothing is dropped silently
    target_state = target.state_dict()
    for name, tensor in source.state_dict().items():
        if name not in target_state:
            raise ValueError(
                f"layer {layer_idx}: source weight {name!r} of {type(source).__name__} has no counterpart in "
                f"{type(target).__name__} (its weights: {sorted(target_state)})"
            )
        if target_state[name].shape != tensor.shape:
            raise ValueError(
                f"layer {layer_idx}: weight {name!r} has shape {tuple(tensor.shape)} in the source but "
                f"{tuple(target_state[name].shape)} in {type(target).__name__}"
            )
        with torch.no_grad():
            target_state[name].copy_(tensor)


def _source_shape(source: nn.Module) -> dict:
    # read biases and q/k norms off the module being replaced rather than off config.model_type, which is
    # "swaa_<family>" for a saved hybrid; on load the source is the stock module the base class just built
    return {
        "qk_norm": getattr(source, "q_norm", None) is not None,
        "qkv_bias": getattr(source.q_proj, "bias", None) is not None,
        "o_bias": getattr(source.o_proj, "bias", None) is not None,
    }


def _construct(cls, config, layer_idx, shape: dict, options: dict):
    try:
        return cls(config, layer_idx=layer_idx, **{**shape, **options})
    except TypeError as err:
        raise TypeError(f"{cls.__name__} does not accept these options {sorted(options)}: {err}") from None


def check_layer_options(config, kind: str, options: dict) -> None:
    """Build one layer of ``kind`` with ``options`` for ``config`` on the meta device (no memory, no weights),
    so options it does not take, or values it refuses, fail before a model is loaded or touched."""
    with torch.device("meta"):
        _construct(layer_class(kind), config, 0, {}, options)


def build_linear_layers(model, indices: list[int], kind: str, options: dict, copy_weights: bool) -> dict:
    """New linear modules for ``indices`` without touching ``model`` (so a failure leaves it as it was)."""
    cls = layer_class(kind)
    layers = decoder_layers(model)
    built = {}
    for i in indices:
        source = layers[i].self_attn
        reference = next(source.parameters(), None)
        new = _construct(cls, model.config, i, _source_shape(source), options)
        if reference is not None and reference.device.type != "meta":
            new = new.to(device=reference.device, dtype=reference.dtype)
        elif reference is not None:
            new = new.to(dtype=reference.dtype)
        if copy_weights:
            _copy_weights(source, new, i)
        built[i] = new
    return built


def apply_record(model, record: dict, copy_weights: bool) -> None:
    """Swap the recorded layers of ``model`` (used by conversion and by the hybrid classes on init)."""
    built = build_linear_layers(
        model, record["linear_layers"], record["kind"], record["options"], copy_weights
    )
    layers = decoder_layers(model)
    for i, module in built.items():
        layers[i].self_attn = module
