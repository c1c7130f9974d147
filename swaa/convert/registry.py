"""Registered hybrid classes: how a saved hybrid comes back through transformers' Auto classes.

For every family in the table there is a config subclass (``SwaaQwen3Config``, ``model_type="swaa_qwen3"``)
and, for every Auto class that knows the family (``AutoModel``, ``AutoModelForCausalLM``,
``AutoModelForSequenceClassification``, ...), a subclass of its model class (``SwaaQwen3ForCausalLM``,
``SwaaQwen3Model``, ...) that builds the stock model with the linear layers recorded in
``config.swaa_hybrid`` in place. ``from_pretrained`` on a saved hybrid needs no ``trust_remote_code`` and no
pickle: the architecture comes from the config, the weights from safetensors.

What the subclasses add to the stock classes, and why:
- the record is checked before anything is built (:func:`swaa.convert.record.check_record`): a ``swaa_*``
  model type without a valid record is refused, naming the field;
- the recorded layers are swapped in before transformers initialises the weights, so a hybrid built from a
  config gets ``initializer_range`` on the converted layers' projections like every other layer, and
  ``_init_weights`` knows the parameters a conversion adds (gates, feature maps, output norm and gate):
  they get the initialisation their layer class documents, never a zero gate bias;
- loading is strict: weights a recorded layer lacks, weights no layer takes and shapes that differ are an
  error naming the layers and the keys, instead of a load report and freshly initialised layers;
- ``output_attentions=True`` returns one entry per layer, ``None`` in a converted layer's place (a linear
  layer has no attention matrix), so ``attentions[i]`` is layer ``i``.
"""

from __future__ import annotations

import functools
import os
import re
import threading

import torch

from swaa.convert.record import KINDS, RECORD_KEY, RecordError, check_record, hybrid_record
from swaa.convert.swap import apply_record, decoder_layers, layer_class
from swaa.families import FAMILIES, Family

__all__ = [
    "HybridLoadError",
    "HybridModelMixin",
    "UnreadableWeightsError",
    "hybrid_classes",
    "register_hybrid_classes",
    "unreadable_weights_error",
]

_classes: dict[str, tuple[type, type]] = {}
_lock = threading.Lock()
_registered = False

# keys listed per layer in a loading error before "... and N more"
_KEYS_SHOWN = 4


class HybridLoadError(ValueError):
    """A saved hybrid whose weights do not fit the model its config records (missing, unexpected or
    reshaped weights); the message names the folder, the layers and the keys."""


class UnreadableWeightsError(OSError):
    """A weights file that is not a readable safetensors file (truncated or damaged); names the file."""


class HybridModelMixin:
    """What every registered hybrid model class adds to the stock class it subclasses (see the module
    docstring). Comes first in the bases, so ``super()`` is the stock class."""

    def __init__(self, config, *args, **kwargs):
        # refused before the stock model is built: nothing is allocated for a config that cannot load
        check_record(config)
        super().__init__(config, *args, **kwargs)

    def post_init(self):
        # the stock __init__ ends here; swapping first lets transformers initialise the new layers too
        record = hybrid_record(self.config)
        try:
            apply_record(self, record, copy_weights=False)
        except (TypeError, ValueError) as err:
            raise RecordError(f"{RECORD_KEY}.options {record['options']}: {err}") from None
        super().post_init()

    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, _layer_classes()):
            _init_added_parameters(module)

    def initialize_weights(self):
        # transformers hands the inner base model's modules to that model's own (stock) _init_weights, which
        # knows nothing of the added parameters (it zeroes the gate bias): those are set right afterwards.
        # Layers transformers had already marked initialised (loaded whole) are left alone
        layers = [m for m in self.modules() if isinstance(m, _layer_classes())]
        done = {id(m) for m in layers if getattr(m, "_is_hf_initialized", False)}
        super().initialize_weights()
        for module in layers:
            if id(module) not in done:
                _init_added_parameters(module)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        want_info = kwargs.pop("output_loading_info", False)
        # mismatched shapes are reported below with their keys (transformers' own error names none)
        user_ignores_sizes = kwargs.get("ignore_mismatched_sizes", False)
        kwargs["ignore_mismatched_sizes"] = True
        where = str(pretrained_model_name_or_path)
        try:
            model, info = super().from_pretrained(
                pretrained_model_name_or_path, *args, output_loading_info=True, **kwargs
            )
        except RecordError as err:
            raise RecordError(f"{_config_file(where)}: {err}") from None
        except Exception as err:
            if type(err).__name__ != "SafetensorError":
                raise
            raise unreadable_weights_error(where, err) from None
        _check_loaded_whole(model, info, where, check_shapes=not user_ignores_sizes)
        return (model, info) if want_info else model


def _layer_classes() -> tuple[type, ...]:
    return tuple(layer_class(kind) for kind in KINDS)


def _init_added_parameters(module) -> None:
    # the initialisation the layer class documents for what a conversion adds (its reset_parameters), on the
    # tensors transformers did not load: loaded tensors carry `_is_hf_initialized` (4.57 and 5.x alike)
    params = dict(module.named_parameters())
    loaded = {n: p.detach().clone() for n, p in params.items() if getattr(p, "_is_hf_initialized", False)}
    if len(loaded) == len(params):
        return
    with torch.no_grad():
        module.reset_parameters()
        for name, value in loaded.items():
            params[name].copy_(value)


def _forward_for(base_forward):
    """The stock forward, with ``attentions`` given one entry per layer (None for a converted one)."""

    @functools.wraps(base_forward)  # generate() reads the stock signature (logits_to_keep, ...)
    def forward(self, *args, **kwargs):
        as_tuple = kwargs.get("return_dict", getattr(self.config, "return_dict", True)) is False
        if as_tuple:
            kwargs["return_dict"] = True
        out = base_forward(self, *args, **kwargs)
        attentions = getattr(out, "attentions", None)
        if attentions is not None:
            out.attentions = _attentions_per_layer(self, attentions)
        return out.to_tuple() if as_tuple else out

    return forward


def _attentions_per_layer(model, attentions):
    converted = set(hybrid_record(model.config)["linear_layers"])
    n = len(decoder_layers(model))
    if len(attentions) != n - len(converted):
        return attentions  # not one entry per softmax layer: leave what transformers gave as it is
    softmax = iter(attentions)
    return tuple(None if i in converted else next(softmax) for i in range(n))


def _config_file(where: str) -> str:
    return os.path.join(where, "config.json") if os.path.isdir(where) else f"config.json of {where!r}"


def unreadable_weights_error(where: str, err: Exception) -> UnreadableWeightsError:
    """The error for safetensors' ``SafetensorError`` while loading from ``where``, naming the first file
    of the folder whose header does not read."""
    reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    bad = None
    if os.path.isdir(where):
        from safetensors import safe_open

        for name in sorted(os.listdir(where)):
            if name.endswith(".safetensors"):
                try:
                    with safe_open(os.path.join(where, name), framework="pt"):
                        pass
                except Exception:
                    bad = os.path.join(where, name)
                    break
    return UnreadableWeightsError(
        f"{bad or where}: not a readable safetensors file ({reason}); it is truncated or damaged: "
        "save or download the model again"
    )


def _check_loaded_whole(model, info: dict, where: str, check_shapes: bool) -> None:
    """Refuse a load in which a decoder layer lacks weights, is given weights it has no place for, or got
    weights of another shape: the record and the weights describe different models."""
    layers = decoder_layers(model)
    prefix = next(name for name, m in model.named_modules() if m is layers) + "."
    pattern = re.compile(rf"^{re.escape(prefix)}(\d+)\.(.+)$")
    record = hybrid_record(model.config)
    converted = set(record["linear_layers"])

    def per_layer(keys):
        found: dict[int, list[str]] = {}
        for key in keys:
            if m := pattern.match(key):
                found.setdefault(int(m.group(1)), []).append(m.group(2))
        return found

    def shown(keys):
        keys = sorted(keys)
        more = f" and {len(keys) - _KEYS_SHOWN} more" if len(keys) > _KEYS_SHOWN else ""
        return ", ".join(keys[:_KEYS_SHOWN]) + more

    def what(i):
        return f"layer {i} ({record['kind'] if i in converted else 'softmax attention'})"

    problems = []
    for i, keys in sorted(per_layer(info.get("missing_keys", ())).items()):
        problems.append(f"{what(i)} has no weights for {shown(keys)}")
    for i, keys in sorted(per_layer(info.get("unexpected_keys", ())).items()):
        problems.append(f"{what(i)} has no place for the weights {shown(keys)}")
    if check_shapes:
        state = model.state_dict()
        for entry in sorted(info.get("mismatched_keys", ()), key=str):
            key, saved = (entry[0], tuple(entry[1])) if isinstance(entry, tuple) else (entry, None)
            expected = tuple(state[key].shape) if key in state else None
            saved = f"of shape {saved}" if saved is not None else "of another shape"
            problems.append(
                f"weight {key} in the checkpoint is {saved}; the model its config describes takes {expected}"
            )
    if problems:
        raise HybridLoadError(
            f"{where}: the weights do not match the hybrid its config.json records ({RECORD_KEY}: "
            f"{record['kind']} layers {record['linear_layers']}): "
            + "; ".join(problems)
            + ". A hybrid loads whole or not at all: fix config.json or convert the source model again"
        )


def _make_config_class(family: Family) -> type:
    base_config = family.load_config_class()
    name = f"Swaa{base_config.__name__}"
    config_cls = type(
        name,
        (base_config,),
        {
            "model_type": family.hybrid_model_type,
            "__module__": __name__,
            "__doc__": f"{base_config.__name__} of a swaa hybrid; the conversion is in ``config.{RECORD_KEY}``.",
        },
    )
    globals()[name] = config_cls  # importable by name, like any class defined in this module
    return config_cls


def _make_model_class(base_model: type, config_cls: type) -> type:
    name = f"Swaa{base_model.__name__}"
    if name in globals():
        return globals()[name]
    model_cls = type(
        name,
        (HybridModelMixin, base_model),
        {
            "config_class": config_cls,
            "forward": _forward_for(base_model.forward),
            "__module__": __name__,
            "__doc__": f"{base_model.__name__} whose layers listed in ``config.{RECORD_KEY}`` are linear attention.",
        },
    )
    globals()[name] = model_cls
    return model_cls


def _auto_classes_of(family: Family):
    """``(auto_class, model_class)`` for every transformers Auto class that maps the family's model type."""
    import importlib

    from transformers.models.auto import modeling_auto

    module = importlib.import_module(family.module)
    for auto_cls in vars(modeling_auto).values():
        mapping = getattr(getattr(auto_cls, "_model_mapping", None), "_model_mapping", None)
        if not isinstance(auto_cls, type) or not isinstance(mapping, dict):
            continue
        class_name = mapping.get(family.model_type)
        model_cls = getattr(module, class_name, None) if isinstance(class_name, str) else None
        if isinstance(model_cls, type):
            yield auto_cls, model_cls


def hybrid_classes(family: Family) -> tuple[type, type]:
    """``(config_class, causal_lm_class)`` of the hybrid of ``family``, created and registered on first use."""
    register_hybrid_classes()
    return _classes[family.model_type]


def register_hybrid_classes() -> None:
    """Create and register the hybrid config/model classes of every family (idempotent, thread-safe).

    Runs at the first lookup of a ``swaa_*`` model type (see ``swaa/__init__.py``), so that ``AutoConfig``,
    ``AutoModelForCausalLM``, ``AutoModel`` and the task heads know ``swaa_<family>``.
    """
    global _registered
    if _registered:
        return
    with _lock:
        if _registered:
            return
        from transformers import AutoConfig

        for family in FAMILIES.values():
            config_cls = _make_config_class(family)
            AutoConfig.register(family.hybrid_model_type, config_cls, exist_ok=True)
            causal_lm = None
            for auto_cls, base_model in _auto_classes_of(family):
                model_cls = _make_model_class(base_model, config_cls)
                auto_cls.register(config_cls, model_cls, exist_ok=True)
                if base_model is family.load_causal_lm_class():
                    causal_lm = model_cls
            _classes[family.model_type] = (config_cls, causal_lm)
        _registered = True
