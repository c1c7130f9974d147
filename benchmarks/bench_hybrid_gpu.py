"""End-to-end GPU benchmark: a Qwen3-1.7B-shaped model against its hybrid with 3 of every 4 layers GLA.

Random weights (the speed does not depend on them), bf16, B=1, DynamicCache. For each variant and context
length: prefill time of the whole prompt, decode ms/token (one token at a time into the same cache, greedy),
cache bytes after the prefill, and peak GPU memory. All variants, the transformers baselines included, run
in the same process on the same GPU.

Variants:
    sdpa          transformers' Qwen3, attn_implementation="sdpa", default backend choice
    sdpa_flash    the same model with SDPA forced to the flash backend
    hybrid        layers "every:4" converted to GLA (21 of 28; softmax kept at 3, 7, ..., 27), default SDPA
    hybrid_flash  the hybrid with its 7 softmax layers forced to SDPA's flash backend

Timing: CUDA events around each call after warm-up; the median is reported. Decode is timed per step
(``model(next_token, cache=...)``), which includes the Python/launch overhead that dominates decode at B=1.

Usage:
    python benchmarks/bench_hybrid_gpu.py --out benchmarks/results/hybrid_gpu.json
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import platform
import statistics
import time

import torch
from common import pkg_version

SHAPE = dict(
    hidden_size=2048,
    intermediate_size=6144,
    num_hidden_layers=28,
    num_attention_heads=16,
    num_key_value_heads=8,
    head_dim=128,
    vocab_size=151936,
    max_position_embeddings=40960,
    rope_theta=1000000.0,
    tie_word_embeddings=True,
)
HYBRID_LAYERS = "every:4"


def versions() -> dict:
    import transformers

    out = {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
    }
    for name in ("triton", "fla"):
        try:
            out[name] = __import__(name).__version__
        except Exception:  # noqa: BLE001 (report what is missing, never fail on it)
            out[name] = None
    # the distributions FLA travels as (the wheels carried to a lent GPU)
    out.update({name: pkg_version(name) for name in ("flash-linear-attention", "fla-core")})
    return out


# a few-MB model of the same structure, for a CPU smoke run of this script (--tiny --device cpu)
TINY_SHAPE = dict(
    SHAPE,
    hidden_size=64,
    intermediate_size=128,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    vocab_size=1000,
)


def build_model(shape: dict, device: str):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    config = Qwen3Config(**shape, attn_implementation="sdpa")
    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen3ForCausalLM(config).to(torch.bfloat16).eval()
    return model


def sdpa_context(force_flash: bool):
    if not force_flash:
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel(SDPBackend.FLASH_ATTENTION)


def cache_tensors_bytes(cache) -> int:
    total = 0
    for i, layer in enumerate(cache.layers):
        for name in ("keys", "values"):
            t = getattr(layer, name, None)
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
        state = cache.get_recurrent_state(i) if hasattr(cache, "is_recurrent_state_initialized") else None
        for t in state if isinstance(state, (tuple, list)) else [state]:
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
    return total


def timed(fn) -> tuple[float, object]:
    if not torch.cuda.is_available():
        t = time.perf_counter()
        out = fn()
        return 1e3 * (time.perf_counter() - t), out
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    out = fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end), out


@torch.no_grad()
def measure(
    model,
    context: int,
    force_flash: bool,
    prefill_reps: int,
    warmup_steps: int,
    decode_steps: int,
    vocab: int,
) -> dict:
    from transformers import DynamicCache

    from swaa.layers.host_inputs import cache_argument

    arg = cache_argument(model)
    device = model.device
    g = torch.Generator(device=device).manual_seed(context)
    ids = torch.randint(0, vocab, (1, context), device=device, generator=g)

    def prefill():
        cache = DynamicCache()
        out = model(ids, use_cache=True, logits_to_keep=1, **{arg: cache})
        return out.logits, cache

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    with sdpa_context(force_flash):
        prefill()  # warm-up (kernel selection, autotuning)
        times = []
        for _ in range(prefill_reps):
            ms, (logits, cache) = timed(prefill)
            times.append(ms)
        cache_bytes = cache_tensors_bytes(cache)
        token = logits[:, -1:].argmax(-1)
        steps = []
        for step in range(warmup_steps + decode_steps):
            ms, logits = timed(lambda token=token: model(token, use_cache=True, **{arg: cache}).logits)
            token = logits[:, -1:].argmax(-1)
            if step >= warmup_steps:
                steps.append(ms)
        finite = bool(logits.isfinite().all())
    return {
        "context": context,
        "prefill_ms": statistics.median(times),
        "prefill_ms_all": times,
        "decode_ms_per_token": statistics.median(steps),
        "decode_ms_p10": sorted(steps)[len(steps) // 10],
        "decode_ms_p90": sorted(steps)[(9 * len(steps)) // 10],
        "cache_bytes_after_prefill": cache_bytes,
        "peak_memory_bytes": torch.cuda.max_memory_allocated() if device.type == "cuda" else 0,
        "logits_finite": finite,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", default="benchmarks/results/hybrid_gpu.json")
    parser.add_argument("--contexts", default="1024,8192,32768", help="comma-separated prompt lengths")
    parser.add_argument("--variants", default="sdpa,sdpa_flash,hybrid,hybrid_flash")
    parser.add_argument("--prefill-reps", type=int, default=3)
    parser.add_argument("--warmup-steps", type=int, default=8)
    parser.add_argument("--decode-steps", type=int, default=32)
    parser.add_argument("--device", default="cuda", help="cuda; cpu only for a smoke run of the script")
    parser.add_argument(
        "--tiny", action="store_true", help="tiny shape (smoke run), not the Qwen3-1.7B shape"
    )
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench_hybrid_gpu: needs a CUDA GPU (or --device cpu --tiny for a smoke run)")
    shape = TINY_SHAPE if args.tiny else SHAPE

    import swaa  # noqa: F401
    from swaa.convert import convert_to_hybrid, hybrid_record

    contexts = [int(c) for c in args.contexts.split(",")]
    variants = [v.strip() for v in args.variants.split(",")]
    known = {"sdpa", "sdpa_flash", "hybrid", "hybrid_flash"}
    if set(variants) - known:
        raise SystemExit(f"--variants: unknown {sorted(set(variants) - known)}; known: {sorted(known)}")
    started = time.time()
    model = build_model(shape, args.device)
    results = []
    # baselines first, then the same model object converted in place
    for variant in [v for v in variants if not v.startswith("hybrid")] + [
        v for v in variants if v.startswith("hybrid")
    ]:
        if variant.startswith("hybrid") and hybrid_record(model.config) is None:
            convert_to_hybrid(model, HYBRID_LAYERS, kind="gla")
        for context in contexts:
            row = measure(
                model,
                context,
                force_flash=variant.endswith("flash"),
                prefill_reps=args.prefill_reps,
                warmup_steps=args.warmup_steps,
                decode_steps=args.decode_steps,
                vocab=shape["vocab_size"],
            )
            row["variant"] = variant
            results.append(row)
            print(
                f"{variant:<13} T={context:<6} prefill {row['prefill_ms']:9.1f} ms  decode "
                f"{row['decode_ms_per_token']:7.2f} ms/token  cache {row['cache_bytes_after_prefill'] / 1e9:6.3f} GB  "
                f"peak {row['peak_memory_bytes'] / 1e9:6.2f} GB",
                flush=True,
            )
    record = {
        "benchmark": "hybrid_gpu_e2e",
        "device": torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or "cpu",
        "versions": versions(),
        "shape": {**shape, "dtype": "bfloat16", "batch_size": 1},
        "hybrid": hybrid_record(model.config),
        "timing": {
            "method": "CUDA events per call after warm-up; median",
            "prefill_reps": args.prefill_reps,
            "decode_warmup_steps": args.warmup_steps,
            "decode_steps": args.decode_steps,
        },
        "results": results,
        "wall_s": time.time() - started,
    }
    with open(args.out, "w") as f:
        json.dump(record, f, indent=2)

    print()
    print(f"device: {record['device']}  versions: {record['versions']}")
    print(
        f"{'variant':<13} {'context':>7} {'prefill ms':>11} {'decode ms/tok':>14} {'cache GB':>9} {'peak GB':>8}"
    )
    for r in results:
        print(
            f"{r['variant']:<13} {r['context']:>7} {r['prefill_ms']:>11.1f} {r['decode_ms_per_token']:>14.2f} "
            f"{r['cache_bytes_after_prefill'] / 1e9:>9.3f} {r['peak_memory_bytes'] / 1e9:>8.2f}"
            + ("" if r["logits_finite"] else "  (non-finite logits!)")
        )
    # verdict: the faster hybrid against the faster baseline at each context, for decode and prefill
    for context in contexts:
        rows = {r["variant"]: r for r in results if r["context"] == context}
        base = [rows[v] for v in ("sdpa", "sdpa_flash") if v in rows]
        hyb = [rows[v] for v in ("hybrid", "hybrid_flash") if v in rows]
        if not base or not hyb:
            continue
        for metric, label in (("decode_ms_per_token", "decode"), ("prefill_ms", "prefill")):
            b = min(base, key=lambda r: r[metric])
            h = min(hyb, key=lambda r: r[metric])
            verdict = "faster" if h[metric] < b[metric] else "NOT faster"
            print(
                f"T={context}: {label} best hybrid ({h['variant']}) {h[metric]:.2f} ms vs best baseline "
                f"({b['variant']}) {b[metric]:.2f} ms: {b[metric] / h[metric]:.2f}x, {verdict}"
            )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
