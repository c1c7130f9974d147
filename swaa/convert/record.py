"""The conversion record: what a conversion writes into ``config.swaa_hybrid`` and how it is read back.

Keys: ``linear_layers`` (sorted distinct indices), ``kind`` (a key of ``KINDS``), ``options`` (the layer
options, JSON values), ``swaa_version``. The layer selection language (``"every:4"``, ``"0,2,5-7"``...) is
parsed here too, since that is what a record's indices come from.
"""

from __future__ import annotations

import json
import operator
import re
from collections.abc import Iterable

__all__ = ["KINDS", "RECORD_KEY", "check_kind", "check_options", "hybrid_record", "parse_linear_layers"]

# config attribute holding the conversion; saved into config.json with the rest of the config
RECORD_KEY = "swaa_hybrid"

# conversion kind -> class name in swaa.layers
KINDS = {
    "gla": "GatedLinearAttention",
    "linear": "LinearAttention",
    "swa_gla": "SlidingWindowGatedLinearAttention",
    "swa_linear": "SlidingWindowLinearAttention",
}

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


def check_kind(kind) -> str:
    """``kind`` if it names a conversion kind, else ValueError listing them."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {sorted(KINDS)}, got {kind!r}")
    return kind


def check_options(options: dict) -> dict:
    """A JSON round trip of the layer options: they go into config.json and come back on load."""
    try:
        return json.loads(json.dumps(options))
    except (TypeError, ValueError) as err:
        raise TypeError(f"layer options must be JSON values (str, number, bool, list, dict): {err}") from None
