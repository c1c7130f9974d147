"""Flags that several ``swaa`` commands share, built in one place: the dtypes a model loads in, the
conversion flags (``--linear-layers``, ``--kind``, ``--option``) and how ``--option KEY=VALUE`` reads.
Imports no torch, so building the parser stays cheap."""

from __future__ import annotations

import json

from swaa.conversion import KINDS

__all__ = ["DTYPES", "add_conversion_flags", "parse_options"]

DTYPES = ("float32", "bfloat16", "float16")


def parse_options(pairs: list[str]) -> dict:
    """``--option KEY=VALUE`` pairs as a dict: numbers, booleans and null as JSON, the rest as text."""
    options = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"--option expects KEY=VALUE, got {pair!r}")
        # numbers, booleans and null as JSON, anything else as a plain string
        try:
            options[key] = json.loads(value)
        except json.JSONDecodeError:
            options[key] = value
    return options


def add_conversion_flags(p, required: bool = False, default=None, kind: str = "gla") -> None:
    """``--linear-layers`` (required, or with ``default``), ``--kind`` (default ``kind``) and ``--option`` on
    parser ``p``."""
    p.add_argument(
        "--linear-layers",
        required=required,
        default=default,
        metavar="SPEC",
        help="layers to convert: 'all', 'none', 'last:N', 'first:N', 'every:N' (keep every N-th layer softmax), "
        "or indices/ranges like '0,2,5-7'; negative indices count from the end ('-1', or '=-1,-2' when the "
        "value starts with '-')"
        + ("" if required else " (default: no conversion)" if default is None else f" (default: {default})"),
    )
    p.add_argument("--kind", default=kind, choices=sorted(KINDS), help=f"linear layer kind (default: {kind})")
    p.add_argument(
        "--option",
        action="append",
        metavar="KEY=VALUE",
        help="layer option, repeatable (e.g. gate=from_keys)",
    )
