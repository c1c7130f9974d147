"""Argument checks shared by every part of swaa: the one place that says what a valid int, number or
flag is, and how the error reads.

Pure Python (no torch, no transformers, no other swaa module), so ``swaa.cache`` and ``swaa.kernels``
can both sit on it without knowing each other. Each check returns the value it was given, or raises a
TypeError (wrong type; ``bool`` is never an int or a number here) or ValueError (out of range) whose
message names the argument, what it must be and what it got.
"""

from __future__ import annotations

import math
import numbers

__all__ = ["check_bool", "check_int", "check_number"]


def check_int(name: str, value, *, minimum: int | None = None, allow_none: bool = False):
    """``value`` if it is an int (not a bool; any ``numbers.Integral``) that is at least ``minimum``.

    Args:
        name (str): the argument's name, as the caller knows it.
        value: what was given.
        minimum (int, Optional): the smallest accepted value. Default: None (no bound).
        allow_none (bool): accept None as well. Default: False.
    """
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(
            f"{name} must be {_int_phrase(minimum, allow_none)}, got {type(value).__name__} {value!r}"
        )
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be {_int_phrase(minimum, allow_none)}, got {value!r}")
    return int(value)


def check_number(name: str, value, *, positive: bool = False, finite: bool = True, allow_none: bool = False):
    """``value`` if it is a real number (int or float, not a bool), finite unless ``finite=False``, and
    greater than zero when ``positive``.

    Args:
        name (str): the argument's name.
        value: what was given.
        positive (bool): require ``value > 0``. Default: False.
        finite (bool): refuse inf and NaN. Default: True.
        allow_none (bool): accept None as well. Default: False.
    """
    if value is None and allow_none:
        return None
    what = ("a positive number" if positive else "a finite number" if finite else "a number") + (
        " or None" if allow_none else ""
    )
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be {what}, got {type(value).__name__} {value!r}")
    if finite and not math.isfinite(value):
        raise ValueError(f"{name} must be {what}, got {value!r}")
    if positive and not value > 0:
        raise ValueError(f"{name} must be {what}, got {value!r}")
    return value


def check_bool(name: str, value) -> bool:
    """``value`` if it is a real bool: options read from JSON or the command line arrive as text, and
    ``"False"`` is truthy."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__} {value!r}")
    return value


def _int_phrase(minimum, allow_none) -> str:
    if minimum == 1:
        phrase = "a positive int"
    elif minimum == 0:
        phrase = "a non-negative int"
    elif minimum is None:
        phrase = "an int"
    else:
        phrase = f"an int >= {minimum}"
    return phrase + (" or None" if allow_none else "")
