"""Saving a model that holds swaa layers: ``save_pretrained`` writes what reloads as the same model, or
refuses before it writes anything.

A layer swapped in by hand (``model.model.layers[3].self_attn = GatedLinearAttention(model.config, 3)``)
is not in the model's conversion record, so its config.json would describe the model it came from: the
checkpoint would reload with softmax attention in that place and the layer's weights left over. The first
swaa layer built in a process wraps transformers' ``PreTrainedModel.save_pretrained`` (once, idempotent) so
that saving such a model is refused with a message pointing at :func:`swaa.convert_to_hybrid`, which copies
the replaced attention's weights and records the conversion. Models without swaa layers are not affected;
``torch.save(model.state_dict())`` is not either.
"""

from __future__ import annotations

import functools
import re
import threading

from swaa.conversion import KINDS, RECORD_KEY

__all__ = ["check_layers_recorded", "guard_save_pretrained"]

_lock = threading.Lock()
_installed = False
_PLACE = re.compile(r"(?:^|\.)layers\.(\d+)\.self_attn$")


def check_layers_recorded(model, layer_class: type) -> None:
    """Raise ValueError if ``model`` holds a swaa layer (an instance of ``layer_class``) that its config's
    conversion record does not name (a layer placed by hand, or one of another kind than the record's),
    naming the layers."""
    placed = [(name, m) for name, m in model.named_modules() if isinstance(m, layer_class)]
    if not placed:
        return
    record = getattr(getattr(model, "config", None), RECORD_KEY, None) or {}
    recorded_class = KINDS.get(record.get("kind"))
    recorded = set(record.get("linear_layers", ()))
    unrecorded = []
    for name, module in placed:
        m = _PLACE.search(name)
        if not (m and int(m.group(1)) in recorded and type(module).__name__ == recorded_class):
            unrecorded.append((name, module, int(m.group(1)) if m else None))
    if not unrecorded:
        return
    kinds = {
        kind for kind, cls in KINDS.items() for _, module, _ in unrecorded if type(module).__name__ == cls
    }
    indices = sorted(i for _, _, i in unrecorded if i is not None)
    how = f"swaa.convert_to_hybrid(model, {indices}" + (
        f", kind={kinds.pop()!r})" if len(kinds) == 1 else ")"
    )
    names = ", ".join(f"{name} ({type(module).__name__})" for name, module, _ in unrecorded)
    raise ValueError(
        f"save_pretrained: {names} {'is' if len(unrecorded) == 1 else 'are'} not in the conversion record of "
        "model.config (placed by hand?), so the saved model would reload with softmax attention there and "
        f"leave these weights unused; nothing was written. Build the hybrid with {how} instead: it copies "
        "the replaced attention's weights and records the conversion in config.json"
    )


def guard_save_pretrained(layer_class: type) -> None:
    """Make transformers' ``PreTrainedModel.save_pretrained`` run :func:`check_layers_recorded` first for
    instances of ``layer_class`` (once per process; thread-safe). Called when a swaa layer is built."""
    global _installed
    if _installed:
        return
    with _lock:
        if _installed:
            return
        from transformers import modeling_utils

        original = modeling_utils.PreTrainedModel.save_pretrained

        @functools.wraps(original)
        def save_pretrained(self, *args, **kwargs):
            check_layers_recorded(self, layer_class)
            return original(self, *args, **kwargs)

        modeling_utils.PreTrainedModel.save_pretrained = save_pretrained
        _installed = True
