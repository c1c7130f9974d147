"""The conversion record: what a conversion writes into ``config.swaa_hybrid`` and how it is read back.

Keys: ``linear_layers`` (sorted distinct indices), ``kind`` (a key of ``KINDS``), ``options`` (the layer
options, JSON values), ``swaa_version``, and ``seed`` when ``swaa convert`` wrote it. The layer selection language (``"every:4"``, ``"0,2,5-7"``...) is
parsed here too, since that is what a record's indices come from.
"""

from __future__ import annotations

import json
import operator
import re
from collections.abc import Iterable

from swaa.conversion import KINDS, RECORD_KEY

__all__ = [
    "KINDS",
    "RECORD_KEY",
    "RecordError",
    "check_kind",
    "check_options",
    "check_record",
    "hybrid_record",
    "parse_linear_layers",
]

_RANGE = re.compile(r"^(\d+)\s*-\s*(\d+)$")
# one index of a comma-separated list; negative ones count from the end ("-1" is the last layer)
_INDEX = re.compile(r"^-?\d+$")

# the keys of a record, as convert_to_hybrid writes them; `swaa convert` adds the seed it ran with
_RECORD_FIELDS = ("linear_layers", "kind", "options", "swaa_version")
_OPTIONAL_FIELDS = ("seed",)


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
            - a comma-separated list of indices and inclusive ranges: ``"0,2,5-7"`` is ``[0, 2, 5, 6, 7]``;
              a negative index counts from the end (``"-1"`` is the last layer, ``"0,-1"`` the first and the
              last); ranges take non-negative bounds.
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
                f"(valid: 0..{num_layers - 1}, or -{num_layers}..-1 counting from the end)"
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
        if _INDEX.match(part):
            indices.append(int(part))
        elif m := _RANGE.match(part):
            start, stop = int(m.group(1)), int(m.group(2))
            if stop < start:
                raise ValueError(f"linear_layers: range {part!r} in {spec!r} runs backwards")
            indices.extend(range(start, stop + 1))
        else:
            raise ValueError(
                f"linear_layers: cannot read {spec!r}; use 'all', 'none', 'last:N', 'first:N', 'every:N', "
                "or indices (negative ones count from the end) and inclusive ranges such as '0,2,5-7' or '0,-1'"
            )
    return indices


def hybrid_record(config) -> dict | None:
    """The conversion recorded in a config (``None`` for a model that was never converted).

    Keys: ``linear_layers`` (list[int]), ``kind`` (str), ``options`` (dict), ``swaa_version`` (str); ``seed``
    (int) when ``swaa convert`` wrote it. Not checked: :func:`check_record` does that.
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


class RecordError(ValueError):
    """A ``swaa_*`` config whose conversion record (``config.swaa_hybrid``) is missing or is not one that
    :func:`swaa.convert_to_hybrid` writes. The message names the field, what it must be and what it is."""


def check_record(config) -> dict:
    """The conversion record of a hybrid's ``config``, checked against what ``convert_to_hybrid`` writes.

    A ``swaa_<family>`` model is rebuilt from this record, so a record that is missing or malformed would
    silently build another model than the one saved (its weights then land nowhere, or layers stay as
    initialised). Nothing is repaired or guessed: every field must be what a conversion writes.

    Returns:
        dict: the record.

    Raises:
        RecordError: no record, a missing or unknown key, ``linear_layers`` that is not a list of distinct
            indices in ``0..num_hidden_layers-1`` (patterns such as ``"every:2"`` are for
            ``convert_to_hybrid``, not for the record), a ``kind`` outside ``KINDS``, ``options`` that are
            not a JSON object, a ``swaa_version`` that is not a string.
    """
    model_type = getattr(config, "model_type", None)
    record = getattr(config, RECORD_KEY, None)
    base_type = str(model_type).removeprefix("swaa_")
    written = "as swaa.convert_to_hybrid writes it"
    if not isinstance(record, dict):
        raise RecordError(
            f"{RECORD_KEY} must be the conversion record of a {model_type} model (a JSON object with "
            f"{', '.join(_RECORD_FIELDS)}, {written}), got {record!r}; a model that was never converted has "
            f"model_type {base_type!r}"
        )
    missing = [k for k in _RECORD_FIELDS if k not in record]
    unknown = sorted(k for k in record if k not in _RECORD_FIELDS + _OPTIONAL_FIELDS)
    if missing or unknown:
        raise RecordError(
            f"{RECORD_KEY} must have the keys {list(_RECORD_FIELDS)} (and may have {list(_OPTIONAL_FIELDS)}), "
            f"{written}; "
            + "; ".join(
                part
                for part in (f"missing {missing}" if missing else "", f"unknown {unknown}" if unknown else "")
                if part
            )
        )
    num_layers = getattr(config, "num_hidden_layers", None)
    layers = record["linear_layers"]
    valid = (
        isinstance(layers, list)
        and all(isinstance(i, int) and not isinstance(i, bool) for i in layers)
        and len(set(layers)) == len(layers)
        and (num_layers is None or all(0 <= i < num_layers for i in layers))
    )
    if not valid:
        where = f"0..{num_layers - 1} (the model has {num_layers} layers)" if num_layers else "range"
        raise RecordError(
            f"{RECORD_KEY}.linear_layers must be a list of distinct layer indices in {where}, {written}, "
            f"got {layers!r}"
        )
    if record["kind"] not in KINDS:
        raise RecordError(f"{RECORD_KEY}.kind must be one of {sorted(KINDS)}, got {record['kind']!r}")
    if not isinstance(record["options"], dict) or not all(isinstance(k, str) for k in record["options"]):
        raise RecordError(
            f"{RECORD_KEY}.options must be a JSON object of layer options, got {record['options']!r}"
        )
    seed = record.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise RecordError(f"{RECORD_KEY}.seed must be an int (the seed swaa convert ran with), got {seed!r}")
    if not isinstance(record["swaa_version"], str):
        raise RecordError(f"{RECORD_KEY}.swaa_version must be a string, got {record['swaa_version']!r}")
    return record
