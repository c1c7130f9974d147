"""Pretrained model -> hybrid: the conversion record, convert_to_hybrid, the registered hybrid classes,
attention transfer.

Rooms: ``record`` (what a conversion writes into the config, and the layer selection language),
``swap`` (building the linear modules and putting them in place), ``hybrid`` (:func:`convert_to_hybrid`),
``registry`` (the ``swaa_<family>`` classes of the Auto classes), ``transfer`` (attention transfer) with
``transfer_options`` (its defaults and checks, torch-free), ``windows`` (a running text as token windows),
``distillation`` (:func:`distill`, end to end on transformers' Trainer) with ``distill_options`` (torch-free) and
``distill_data`` (training text without downloads), ``select`` (``auto:N``: layers chosen by a measured signal).

Names are re-exported lazily, so the torch-free rooms (``record``, ``transfer_options``, ``distill_options``)
stay cheap.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "convert_to_hybrid": "swaa.convert.hybrid",
    "export_decoder": "swaa.convert.export",
    "KINDS": "swaa.convert.record",
    "hybrid_record": "swaa.convert.record",
    "parse_linear_layers": "swaa.convert.record",
    "register_hybrid_classes": "swaa.convert.registry",
    "attention_transfer": "swaa.convert.transfer",
    "distill": "swaa.convert.distillation",
    "select_linear_layers": "swaa.convert.select",
    "resolve_linear_layers": "swaa.convert.select",
    "FAMILIES": "swaa.families",
    "supported_families": "swaa.families",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'swaa.convert' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))
