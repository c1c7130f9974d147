"""swaa's version: the one place it is written (pyproject.toml reads it, the conversion record stores it)."""

__version__ = "0.1.0"
