"""Choosing which layers become linear from a measured signal: ``linear_layers="auto:N"``.

:func:`swaa.convert.record.parse_linear_layers` reads the selection language from the text alone;
``auto:N`` needs the model and some text, so it is resolved here, before ``convert_to_hybrid``:

1. every layer of a copy of the model is converted and fitted to the attention it replaced by a short
   attention transfer (each layer on the original's inputs, so each layer's fit is the fit it would get
   converted alone);
2. each layer gets a score: with ``signal="kl"`` (default) the mean per-token KL(original || model with
   only that layer converted) on the same windows; with ``signal="error"`` its relative output error after
   the transfer;
3. the ``N`` layers with the lowest scores (those whose conversion costs least; ties to the lower index)
   become linear.

Reproducible: the new parameters are drawn after ``torch.manual_seed(seed)`` (the caller's random state is
left as it was), the windows are the first ones of the text, and nothing else is random. The scores and
the choice are recorded in ``config.swaa_selection`` (next to the conversion record ``config.swaa_hybrid``),
which ``save_pretrained`` writes into config.json.
"""

from __future__ import annotations

import copy
import re

import torch

from swaa.validation import check_int

__all__ = [
    "SELECTION_KEY",
    "SIGNALS",
    "auto_count",
    "record_selection",
    "resolve_linear_layers",
    "select_linear_layers",
    "selection_record",
]

# config attribute holding how the layers were chosen
SELECTION_KEY = "swaa_selection"
SIGNALS = ("kl", "error")
# the short attention transfer that each layer's score is measured after
DEFAULT_SELECT_STEPS = 50
DEFAULT_SELECT_WINDOW = 256
DEFAULT_SELECT_WINDOWS = 4

_AUTO = re.compile(r"^\s*auto\s*:\s*(\S*)\s*$", re.IGNORECASE)


def auto_count(linear_layers) -> int | None:
    """``N`` of an ``"auto:N"`` selection; None for every other selection (left to ``parse_linear_layers``).

    Raises:
        ValueError: ``"auto:"`` followed by anything but a non-negative integer.
    """
    if not isinstance(linear_layers, str):
        return None
    m = _AUTO.match(linear_layers)
    if m is None:
        return None
    if not m.group(1).isdigit():
        raise ValueError(f"linear_layers: 'auto:N' needs an integer N >= 0, got {linear_layers!r}")
    return int(m.group(1))


def selection_record(config) -> dict | None:
    """How the converted layers were chosen (``config.swaa_selection``), or None."""
    return getattr(config, SELECTION_KEY, None) or None


def record_selection(config, selection: dict) -> None:
    """Store ``selection`` (as :func:`resolve_linear_layers` returns it) in ``config.swaa_selection``."""
    setattr(config, SELECTION_KEY, selection)


def _check(model, n, signal, input_ids, kind, layer_options, steps, lr, seed):
    from swaa.convert.record import check_kind, check_options, hybrid_record
    from swaa.convert.transfer_options import check_transfer_options

    num_layers = model.config.num_hidden_layers
    check_int("N of auto:N", n, minimum=0)
    if n > num_layers:
        raise IndexError(f"linear_layers: auto:{n} asks for {n} layers of a model with {num_layers} layers")
    if signal not in SIGNALS:
        raise ValueError(f"signal must be one of {SIGNALS}, got {signal!r}")
    check_transfer_options(steps, lr)
    check_int("seed", seed, minimum=0)
    check_kind(kind)
    options = check_options(layer_options)
    if hybrid_record(model.config):
        raise ValueError("auto:N measures each layer against the original: model must not be converted yet")
    if input_ids is None:
        raise ValueError("linear_layers='auto:N' needs text to measure on (input_ids)")
    return options


@torch.no_grad()
def _layer_kl(model, windows, layer_idx, module, teacher_logp) -> float:
    layers = model.model.layers
    original = layers[layer_idx].self_attn
    device = next(model.parameters()).device
    total, count = 0.0, 0
    layers[layer_idx].self_attn = module
    try:
        for w, t in zip(windows, teacher_logp):
            s = torch.log_softmax(model(w[None].to(device), use_cache=False).logits.float(), dim=-1)
            total += (t.exp() * (t - s)).sum().item()
            count += w.numel()
    finally:
        layers[layer_idx].self_attn = original
    return total / count


def select_linear_layers(
    model,
    n: int,
    input_ids: torch.Tensor,
    kind: str = "gla",
    *,
    signal: str = "kl",
    steps: int = DEFAULT_SELECT_STEPS,
    lr: float = 1e-3,
    window: int = DEFAULT_SELECT_WINDOW,
    max_windows: int | None = DEFAULT_SELECT_WINDOWS,
    seed: int = 0,
    progress: bool = True,
    **layer_options,
) -> dict:
    """Measure every layer of ``model`` and choose the ``n`` whose conversion to ``kind`` costs least.

    Args:
        model (PreTrainedModel): the original (not yet converted) model; left as it was (during the KL
            measurement each layer's attention is swapped out and back in turn).
        n (int): how many layers become linear.
        input_ids (torch.Tensor): text ``[N]`` or windows ``[num_windows, T]`` to measure on.
        kind (str): the conversion kind. Default: ``"gla"``.
        signal (str): ``"kl"`` or ``"error"`` (see the module docstring). Default: ``"kl"``.
        steps (int): attention-transfer steps per layer before scoring. Default: 50.
        lr (float): attention-transfer learning rate. Default: 1e-3.
        window (int): tokens per window for ``[N]`` input. Default: 256.
        max_windows (int | None): windows used. Default: 4.
        seed (int): seed of the new parameters' initialisation. Default: 0.
        progress (bool): progress bars. Default: True.
        **layer_options: the layer options, as for ``convert_to_hybrid``.

    Returns:
        dict: the selection record: ``method`` ("auto"), ``spec`` ("auto:N"), ``layers`` (the chosen indices,
        sorted), ``signal``, ``scores`` (one per layer, by index), ``errors`` (each layer's relative error
        after the transfer), ``seed``, ``kind``, ``options``, ``steps``, ``lr``, ``windows``, ``window``.

    Cost: a copy of the model, one attention transfer of every layer, and (``signal="kl"``) one forward of
    the model per layer and window, the original's log-probabilities of every window kept meanwhile.
    """
    from swaa.convert.hybrid import convert_to_hybrid
    from swaa.convert.transfer import attention_transfer
    from swaa.convert.windows import split_windows

    options = _check(model, n, signal, input_ids, kind, layer_options, steps, lr, seed)
    windows = split_windows(input_ids, window, max_windows)
    num_layers = model.config.num_hidden_layers
    device = next(model.parameters()).device
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        probe = convert_to_hybrid(copy.deepcopy(model), "all", kind=kind, **options)
        report = attention_transfer(model, probe, windows, steps=steps, lr=lr, progress=progress)
    modules = {i: probe.model.layers[i].self_attn for i in range(num_layers)}
    del probe
    errors = [float(report["layers"][i]["after"]) for i in range(num_layers)]
    if signal == "error":
        scores = errors
    else:
        from tqdm.auto import tqdm

        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                teacher_logp = [
                    torch.log_softmax(model(w[None].to(device), use_cache=False).logits.float(), dim=-1)
                    for w in windows
                ]
            scores = [
                _layer_kl(model, windows, i, modules[i], teacher_logp)
                for i in tqdm(range(num_layers), desc="auto layers: KL per layer", disable=not progress)
            ]
        finally:
            model.train(was_training)
    chosen = sorted(sorted(range(num_layers), key=lambda i: (scores[i], i))[:n])
    return {
        "method": "auto",
        "spec": f"auto:{n}",
        "layers": chosen,
        "signal": signal,
        "scores": scores,
        "errors": errors,
        "seed": seed,
        "kind": kind,
        "options": options,
        "steps": steps,
        "lr": lr,
        "windows": len(windows),
        "window": int(windows.shape[1]),
    }


def resolve_linear_layers(
    model, linear_layers, input_ids=None, kind: str = "gla", *, seed: int = 0, **select_options
):
    """Indices for ``convert_to_hybrid`` and the record of how they were chosen.

    ``"auto:N"`` is measured by :func:`select_linear_layers` (``input_ids``, ``seed`` and ``select_options``
    go to it: ``signal``, ``steps``, ``lr``, ``window``, ``max_windows``, ``progress``, layer options); any
    other selection goes to ``parse_linear_layers`` and is recorded as given (``method`` "given", with
    ``seed``: the seed a caller draws the new parameters after).

    Returns:
        tuple[list[int], dict]: the indices and the selection record (store it with :func:`record_selection`).
    """
    from swaa.convert.record import parse_linear_layers

    check_int("seed", seed, minimum=0)
    n = auto_count(linear_layers)
    if n is None:
        indices = parse_linear_layers(linear_layers, model.config.num_hidden_layers)
        spec = linear_layers if isinstance(linear_layers, str) else list(indices)
        return indices, {"method": "given", "spec": spec, "layers": indices, "seed": seed}
    selection = select_linear_layers(model, n, input_ids, kind, seed=seed, **select_options)
    return selection["layers"], selection
