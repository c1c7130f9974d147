"""Turn chosen softmax-attention layers of a pretrained model into linear attention or GLA, in place.

The new layer takes the source attention's projections one to one (``q_proj``, ``k_proj``, ``v_proj``,
``o_proj``, and ``q_norm``/``k_norm`` where the family has them); every parameter the source does not have
(GLA's gate projection, a learnable feature map, ...) keeps the initialisation documented by the layer class.
The conversion is recorded in ``config.swaa_hybrid`` so that a saved hybrid rebuilds itself on load.
"""

from __future__ import annotations

import json
import operator
import re
from collections.abc import Iterable

import torch
from torch import nn

from swaa.convert.families import Family, family_of, supported_families

__all__ = ["KINDS", "RECORD_KEY", "convert_to_hybrid", "hybrid_record", "parse_linear_layers"]

# config attribute holding the conversion; saved into config.json with the rest of the config
RECORD_KEY = "swaa_hybrid"

# kind name -> class name in swaa.layers
KINDS = {"gla": "GatedLinearAttention", "linear": "LinearAttention"}

_RANGE = re.compile(r"^(\d+)\s*-\s*(\d+)$")


def parse_linear_layers(linear_layers, num_layers: int) -> list[int]:
    """Resolve a layer selection to a sorted list of distinct layer indices.

    Args:
        linear_layers (Iterable[int] | str):
            which layers become linear. Either indices (an ``int`` iterable; negative indices count from the
            end as in Python) or a string:

            - ``"all"``: every layer; ``"none"`` or ``""``: no layer.
            - ``"last:N"`` / ``"first:N"``: the last / first N layers (whatever the depth of the model).
            - ``"every:N"``: keep every N-th layer softmax, convert the others. The softmax layers are the last
              of each group of N (indices ``N-1, 2N-1, ...``), so ``"every:4"`` on 28 layers converts 21 and
              keeps 3, 7, ..., 27; ``"every:1"`` converts nothing.
            - a comma-separated list of indices and inclusive ranges: ``"0,2,5-7"`` is ``[0, 2, 5, 6, 7]``.
        num_layers (int):
            number of decoder layers of the model.

    Returns:
        list[int]: sorted, distinct, non-negative indices.

    Raises:
        TypeError: ``linear_layers`` is neither a string nor an iterable of ints.
        ValueError: a string that matches none of the forms above, or ``every:N`` with ``N < 1``.
        IndexError: an index outside ``[-num_layers, num_layers)``.
    """
    if isinstance(linear_layers, str):
        indices = _parse_pattern(linear_layers, num_layers)
    else:
        if not isinstance(linear_layers, Iterable) or isinstance(linear_layers, (bytes, dict)):
            raise TypeError(
                f"linear_layers must be a list of layer indices or a pattern string, got {type(linear_layers).__name__}"
            )
        indices = []
        for item in linear_layers:
            if isinstance(item, bool):
                raise TypeError(f"linear_layers must contain ints, got bool {item!r}")
            try:
                indices.append(operator.index(item))
            except TypeError:
                raise TypeError(
                    f"linear_layers must contain ints, got {type(item).__name__} {item!r}"
                ) from None
    resolved = set()
    for i in indices:
        if not -num_layers <= i < num_layers:
            raise IndexError(
                f"linear_layers: layer {i} is out of range for a model with {num_layers} layers "
                f"(valid: 0..{num_layers - 1}, or negative from the end)"
            )
        resolved.add(i % num_layers)
    return sorted(resolved)


def _parse_pattern(spec: str, num_layers: int) -> list[int]:
    text = spec.strip().lower()
    if text in ("", "none"):
        return []
    if text == "all":
        return list(range(num_layers))
    for prefix in ("last:", "first:"):
        if text.startswith(prefix):
            count = text[len(prefix) :].strip()
            if not count.isdigit():
                raise ValueError(f"linear_layers: '{prefix}N' needs an integer N >= 0, got {spec!r}")
            n = int(count)
            if n > num_layers:
                raise IndexError(
                    f"linear_layers: {spec!r} asks for {n} layers of a model with {num_layers} layers"
                )
            return list(range(num_layers - n, num_layers)) if prefix == "last:" else list(range(n))
    if text.startswith("every:"):
        step = text[len("every:") :].strip()
        if not step.isdigit() or int(step) < 1:
            raise ValueError(f"linear_layers: 'every:N' needs an integer N >= 1, got {spec!r}")
        n = int(step)
        return [i for i in range(num_layers) if i % n != n - 1]
    indices = []
    for part in text.split(","):
        part = part.strip()
        if part.isdigit():
            indices.append(int(part))
        elif m := _RANGE.match(part):
            start, stop = int(m.group(1)), int(m.group(2))
            if stop < start:
                raise ValueError(f"linear_layers: range {part!r} in {spec!r} runs backwards")
            indices.extend(range(start, stop + 1))
        else:
            raise ValueError(
                f"linear_layers: cannot read {spec!r}; use 'all', 'none', 'last:N', 'first:N', 'every:N', "
                "or indices and inclusive ranges such as '0,2,5-7'"
            )
    return indices


def hybrid_record(config) -> dict | None:
    """The conversion recorded in a config (``None`` for a model that was never converted).

    Keys: ``linear_layers`` (list[int]), ``kind`` (str), ``options`` (dict), ``swaa_version`` (str).
    """
    return getattr(config, RECORD_KEY, None) or None


def _layer_class(kind: str):
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {sorted(KINDS)}, got {kind!r}")
    import swaa.layers

    return getattr(swaa.layers, KINDS[kind])


def _decoder_layers(model) -> nn.ModuleList:
    # the causal-LM classes of every family keep the decoder as `.model` and its blocks as `.layers`
    return model.model.layers


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


def _check_options(options: dict) -> dict:
    # the options go into config.json and come back on load, so they must survive a JSON round trip
    try:
        return json.loads(json.dumps(options))
    except (TypeError, ValueError) as err:
        raise TypeError(f"layer options must be JSON values (str, number, bool, list, dict): {err}") from None


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


def build_linear_layers(model, indices: list[int], kind: str, options: dict, copy_weights: bool) -> dict:
    """New linear modules for ``indices`` without touching ``model`` (so a failure leaves it as it was)."""
    cls = _layer_class(kind)
    layers = _decoder_layers(model)
    built = {}
    for i in indices:
        source = layers[i].self_attn
        reference = next(source.parameters(), None)
        try:
            new = cls(model.config, layer_idx=i, **{**_source_shape(source), **options})
        except TypeError as err:
            raise TypeError(
                f"{cls.__name__} does not accept these options {sorted(options)}: {err}"
            ) from None
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
    layers = _decoder_layers(model)
    for i, module in built.items():
        layers[i].self_attn = module


def _write_layer_types(config, family: Family, linear_layers: list[int]) -> None:
    if not family.linear_layer_types:
        return
    types = list(getattr(config, "layer_types", None) or ["full_attention"] * config.num_hidden_layers)
    for i in linear_layers:
        types[i] = "linear_attention"
    config.layer_types = types


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
    from swaa import __version__
    from swaa.convert.config import hybrid_classes

    family = _check_family(model)
    _layer_class(kind)
    options = _check_options(layer_options)
    indices = parse_linear_layers(linear_layers, model.config.num_hidden_layers)
    previous = hybrid_record(model.config)
    if previous is not None:
        if previous["kind"] != kind or previous["options"] != options:
            raise ValueError(
                f"model was converted with kind={previous['kind']!r} options={previous['options']}; "
                f"cannot add layers with kind={kind!r} options={options}"
            )
        again = sorted(set(indices) & set(previous["linear_layers"]))
        if again:
            raise ValueError(f"linear_layers: layers {again} are already converted")
    if not indices:
        return model

    built = build_linear_layers(model, indices, kind, options, copy_weights=True)
    layers = _decoder_layers(model)
    for i, module in built.items():
        layers[i].self_attn = module

    all_linear = sorted(set(indices) | set(previous["linear_layers"] if previous else []))
    record = {"linear_layers": all_linear, "kind": kind, "options": options, "swaa_version": __version__}
    setattr(model.config, RECORD_KEY, record)
    _write_layer_types(model.config, family, all_linear)

    # the config object is shared by every submodule, so changing its class (a subclass adding only
    # model_type) is seen everywhere; the model class likewise only adds the rebuild-on-init step
    config_cls, model_cls = hybrid_classes(family)
    if type(model.config) is family.load_config_class():
        model.config.__class__ = config_cls
    if type(model) is family.load_causal_lm_class():
        model.__class__ = model_cls
    return model
