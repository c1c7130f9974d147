"""Turn chosen softmax-attention layers of a pretrained model into linear attention or GLA, in place.

The new layer takes the source attention's projections one to one (``q_proj``, ``k_proj``, ``v_proj``,
``o_proj``, and ``q_norm``/``k_norm`` where the family has them); every parameter the source does not have
(GLA's gate projection, a learnable feature map, ...) keeps the initialisation documented by the layer class.
The conversion is recorded in ``config.swaa_hybrid`` so that a saved hybrid rebuilds itself on load.
"""

from __future__ import annotations

from swaa._version import __version__
from swaa.convert.record import RECORD_KEY, check_kind, check_options, hybrid_record, parse_linear_layers
from swaa.convert.registry import hybrid_classes
from swaa.convert.swap import build_linear_layers, check_layer_options, decoder_layers
from swaa.families import Family, family_of, supported_families

__all__ = ["convert_to_hybrid", "plan_conversion"]


def _check_family(model) -> Family:
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type is None:
        raise TypeError(
            f"model must be a transformers causal LM of a supported family ({supported_families()}), "
            f"got {type(model).__name__}"
        )
    family = family_of(model_type)
    if not isinstance(model, family.load_causal_lm_class()):
        raise TypeError(
            f"model must be a {family.causal_lm_class} for model_type {model_type!r}, got {type(model).__name__}"
        )
    return family


def plan_conversion(config, linear_layers, kind: str = "gla", options: dict | None = None) -> list[int]:
    """Every check of :func:`convert_to_hybrid` that needs only the model's config, so a caller can refuse a
    conversion before loading any weights (the CLI does, for every kind of source).

    Checks the family, ``kind``, that ``options`` are JSON values the layer class takes (one layer is built on
    the meta device), the layer selection, and that a hybrid is converted further only with its own kind and
    options and on layers not converted yet.

    Returns:
        list[int]: the layers that would be converted (sorted, non-negative; empty: nothing to do).

    Raises:
        TypeError, ValueError, IndexError: as :func:`convert_to_hybrid`.
    """
    family_of(getattr(config, "model_type", None))
    check_kind(kind)
    options = check_options(options or {})
    indices = parse_linear_layers(linear_layers, config.num_hidden_layers)
    previous = hybrid_record(config)
    if previous is not None:
        if previous["kind"] != kind or previous["options"] != options:
            raise ValueError(
                f"model was converted with kind={previous['kind']!r} options={previous['options']}; "
                f"cannot add layers with kind={kind!r} options={options}"
            )
        again = sorted(set(indices) & set(previous["linear_layers"]))
        if again:
            raise ValueError(f"linear_layers: layers {again} are already converted")
    if indices:
        check_layer_options(config, kind, options)
    return indices


def convert_to_hybrid(model, linear_layers, kind: str = "gla", **layer_options):
    """Convert chosen attention layers of a pretrained causal LM to linear attention, in place.

    Args:
        model (PreTrainedModel):
            a ``*ForCausalLM`` of a supported family: Qwen3, Qwen2, Llama (incl. SmolLM2), Mistral.
            A hybrid may be converted further with the same ``kind`` and options.
        linear_layers (Iterable[int] | str):
            layers to convert: indices or a pattern (``"all"``, ``"none"``, ``"every:N"`` keeps every N-th layer
            softmax, ``"0,2,5-7"``); see :func:`parse_linear_layers`.
        kind (str):
            ``"gla"`` for :class:`swaa.layers.GatedLinearAttention`, ``"linear"`` for
            :class:`swaa.layers.LinearAttention`. Default: ``"gla"``.
        **layer_options:
            keyword overrides passed to the layer class (e.g. its feature map or gate form); JSON values only,
            since they are saved in the config.

    Returns:
        the same ``model`` object. Its class becomes the registered hybrid subclass (e.g.
        ``SwaaQwen3ForCausalLM``, a subclass of ``Qwen3ForCausalLM``) and its config class the matching
        ``SwaaQwen3Config`` (``model_type="swaa_qwen3"``), so ``save_pretrained`` + ``from_pretrained``
        rebuild the hybrid after ``import swaa``. ``config.swaa_hybrid`` records the layers, kind, options and
        swaa version. Converting an empty selection changes nothing at all.

    Raises:
        TypeError: not a transformers causal LM (or not the causal-LM class of its family), or options the
            layer does not take / that are not JSON values.
        ValueError: a model_type outside the family table (the message lists the supported ones), an unknown
            kind or pattern, a layer already converted, or a kind/options differing from an earlier
            conversion of the same model; a source weight with no place in the new layer.
        IndexError: a layer index out of range.

    Every check runs before the model is modified: a refused call leaves the model as it was.
    """
    family = _check_family(model)
    indices = plan_conversion(model.config, linear_layers, kind, layer_options)
    if not indices:
        return model
    options = check_options(layer_options)
    previous = hybrid_record(model.config)

    built = build_linear_layers(model, indices, kind, options, copy_weights=True)
    layers = decoder_layers(model)
    for i, module in built.items():
        layers[i].self_attn = module

    all_linear = sorted(set(indices) | set(previous["linear_layers"] if previous else []))
    record = {"linear_layers": all_linear, "kind": kind, "options": options, "swaa_version": __version__}
    setattr(model.config, RECORD_KEY, record)

    # the config object is shared by every submodule, so changing its class (a subclass adding only
    # model_type) is seen everywhere; the model class likewise only adds the rebuild-on-init step
    config_cls, model_cls = hybrid_classes(family)
    if type(model.config) is family.load_config_class():
        model.config.__class__ = config_cls
    if type(model) is family.load_causal_lm_class():
        model.__class__ = model_cls
    return model
