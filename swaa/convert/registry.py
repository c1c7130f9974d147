"""Registered hybrid classes: how a saved hybrid comes back through ``AutoModelForCausalLM``.

For every family in the table there is a config subclass (``SwaaQwen3Config``, ``model_type="swaa_qwen3"``)
and a causal-LM subclass (``SwaaQwen3ForCausalLM``) whose ``__init__`` builds the stock model and then swaps in
the linear layers recorded in ``config.swaa_hybrid``. Both are registered with ``AutoConfig`` and
``AutoModelForCausalLM``, so ``from_pretrained`` on a saved hybrid needs no ``trust_remote_code`` and no
pickle: the architecture comes from the config, the weights from safetensors.
"""

from __future__ import annotations

import threading

from swaa.convert.record import RECORD_KEY
from swaa.convert.swap import apply_record
from swaa.families import FAMILIES, Family

__all__ = ["hybrid_classes", "register_hybrid_classes"]

_classes: dict[str, tuple[type, type]] = {}
_lock = threading.Lock()
_registered = False


def _make_classes(family: Family) -> tuple[type, type]:
    base_config = family.load_config_class()
    base_model = family.load_causal_lm_class()
    config_name = f"Swaa{base_config.__name__}"
    model_name = f"Swaa{base_model.__name__}"

    config_cls = type(
        config_name,
        (base_config,),
        {
            "model_type": family.hybrid_model_type,
            "__module__": __name__,
            "__doc__": f"{base_config.__name__} of a swaa hybrid; the conversion is in ``config.{RECORD_KEY}``.",
        },
    )

    def __init__(self, config, *args, **kwargs):
        base_model.__init__(self, config, *args, **kwargs)
        record = getattr(config, RECORD_KEY, None)
        if record:
            # weights come from the checkpoint (or stay as initialised for a fresh model): nothing to copy
            apply_record(self, record, copy_weights=False)

    model_cls = type(
        model_name,
        (base_model,),
        {
            "config_class": config_cls,
            "__init__": __init__,
            "__module__": __name__,
            "__doc__": f"{base_model.__name__} whose layers listed in ``config.{RECORD_KEY}`` are linear attention.",
        },
    )
    # importable by name, like any class defined in this module
    globals()[config_name] = config_cls
    globals()[model_name] = model_cls
    return config_cls, model_cls


def hybrid_classes(family: Family) -> tuple[type, type]:
    """``(config_class, model_class)`` of the hybrid of ``family``, created and registered on first use."""
    register_hybrid_classes()
    return _classes[family.model_type]


def register_hybrid_classes() -> None:
    """Create and register the hybrid config/model classes of every family (idempotent, thread-safe).

    ``import swaa`` calls this, so that ``AutoConfig`` / ``AutoModelForCausalLM`` know ``swaa_<family>``.
    """
    global _registered
    if _registered:
        return
    with _lock:
        if _registered:
            return
        from transformers import AutoConfig, AutoModelForCausalLM

        for family in FAMILIES.values():
            config_cls, model_cls = _make_classes(family)
            AutoConfig.register(family.hybrid_model_type, config_cls, exist_ok=True)
            AutoModelForCausalLM.register(config_cls, model_cls, exist_ok=True)
            _classes[family.model_type] = (config_cls, model_cls)
        _registered = True
