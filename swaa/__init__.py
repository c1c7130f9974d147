"""swaa: linear attention and gated linear attention inside Hugging Face transformers.

Rooms, one direction of imports: ``swaa.cache`` (the KV-cache patch) and ``swaa.kernels`` (FLA on CUDA,
exact torch elsewhere) know nothing of each other; ``swaa.layers`` builds drop-in attention modules on
both; ``swaa.convert`` turns pretrained models into hybrids with those layers; ``swaa.app`` is what a user
runs (CLI, demo, loading, evaluation). ``swaa.families`` (the one family table) and ``swaa.validation``
are pure Python beneath them all.

The names below are re-exported lazily (PEP 562), so ``import swaa.kernels`` loads no transformers and the
CLI pays only for what a command uses. A saved hybrid loads with ``AutoModelForCausalLM.from_pretrained``
after ``import swaa``: the hybrid classes are registered with transformers' Auto classes as soon as the
AutoModel classes are imported (at once if they already are).
"""

from __future__ import annotations

import importlib
import importlib.abc
import sys
import threading

from swaa._version import __version__

# public name -> module that defines it
_EXPORTS = {
    "hack_kv_cache_recurrent_state": "swaa.cache",
    "unhack_kv_cache_recurrent_state": "swaa.cache",
    "GatedLinearAttention": "swaa.layers",
    "LinearAttention": "swaa.layers",
    "convert_to_hybrid": "swaa.convert",
    "attention_transfer": "swaa.convert",
    "distill": "swaa.convert",
    "select_linear_layers": "swaa.convert",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'swaa' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # the next lookup is a plain attribute
    return value


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))


# the module of transformers' AutoModel classes; it imports AutoConfig's on the way
_AUTO_MODULE = "transformers.models.auto.modeling_auto"
_registration_lock = threading.Lock()


def _register_hybrid_classes() -> None:
    from swaa.convert.registry import register_hybrid_classes

    register_hybrid_classes()


def _register_at_first_swaa_lookup() -> None:
    """Make transformers' config table register the hybrid classes the first time it is asked for a
    ``swaa_*`` model type, and only then.

    Registering imports the families' modeling modules. Doing it while transformers is still importing
    (the Auto module often loads halfway through another model module's import) would import that
    module a second time, half-built; the first lookup of a ``swaa_*`` type comes from a user's
    ``from_pretrained``/``from_config``, when every import is done.
    """
    from transformers.models.auto import configuration_auto

    table = type(configuration_auto.CONFIG_MAPPING)
    with _registration_lock:
        if "_swaa_originals" in table.__dict__:
            return
        originals = {name: table.__dict__[name] for name in ("__getitem__", "__contains__")}
        table._swaa_originals = originals

    def registering(name):
        original = originals[name]

        def method(self, key):
            if isinstance(key, str) and key.startswith("swaa_"):
                _register_hybrid_classes()
                with _registration_lock:  # registered for good: the table goes back to what it was
                    if "_swaa_originals" in table.__dict__:
                        for attr, value in originals.items():
                            setattr(table, attr, value)
                        del table._swaa_originals
            return original(self, key)

        return method

    for name in originals:
        setattr(table, name, registering(name))


class _RegisterAfterAutoImport(importlib.abc.MetaPathFinder):
    """Finds nothing itself: when ``_AUTO_MODULE`` is imported, it lets the other finders load it, then
    arms :func:`_register_at_first_swaa_lookup`, and takes itself off ``sys.meta_path``."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname != _AUTO_MODULE:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None and spec.loader is not None and hasattr(spec.loader, "exec_module"):
                spec.loader = _LoaderThenRegister(spec.loader, self)
                return spec
        return None


class _LoaderThenRegister(importlib.abc.Loader):
    def __init__(self, loader, finder):
        self._loader, self._finder = loader, finder

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._loader.exec_module(module)
        with _registration_lock:
            if self._finder in sys.meta_path:
                sys.meta_path.remove(self._finder)
        _register_at_first_swaa_lookup()


def _install_registration() -> None:
    if _AUTO_MODULE in sys.modules:
        _register_at_first_swaa_lookup()
        return
    with _registration_lock:
        if not any(isinstance(f, _RegisterAfterAutoImport) for f in sys.meta_path):
            sys.meta_path.insert(0, _RegisterAfterAutoImport())


_install_registration()
