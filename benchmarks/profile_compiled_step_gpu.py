"""Where a compiled static-cache decode step spends its time (issue 10): the Qwen3-1.7B shape and its every:4
GLA hybrid, B=1, at 1k and 32k tokens of context.

transformers' compiled static-cache generate of the hybrid missed two targets on an H200: at B=1 1k it took
4.21-4.50 ms/step against Qwen3's 4.06, at B=1 32k 6.2 ms/step against a target of 3 (the memory floor,
weights plus the 7 softmax layers' KV, is ~1 ms). This script splits generate's ms/step into what the GPU does
and what the host adds. Per model and context, all in one process:

1. **generate**: ``model.generate(ids, cache_implementation="static")`` through bench_decode_gpu.measure (a
   warm-up generate that compiles, then a timed one; ms/step is the median of CUDA-event intervals between
   tokens, generate's per-step host work included), the same prompt as the raw step's.
2. **raw compiled step**, gpt-fast style: a StaticCache (max_cache_len = context + every step taken here +
   a margin), an eager prefill of ``context`` random tokens (SDPA forced to flash for the softmax layers, as
   bench_decode_gpu.py forces it; a prefill from an empty static cache takes no mask, so flash applies), then
   ``step = torch.compile(decode_one_token, mode="reduce-overhead", fullgraph=True)``, where
   decode_one_token runs the model on [B, 1] ids at their positions and returns the argmax ids. transformers
   5.x has no ``cache_position`` argument: the step passes ``position_ids`` and the static cache keeps its own
   write position; the attention mask is built inside the graph (generate builds it on the host every step
   and passes it in). ``--raw-warmup`` calls (compile, CUDA-graph record, first replays), then ``--steps`` timed
   calls, each argmax fed back (cloned: a CUDA-graph output is overwritten by the next replay), no host sync
   in the loop, CUDA events around it: ``raw_ms_per_step`` = total / steps; ``host_issue_ms_per_step`` is
   the host's time to issue them (before the final sync: near raw the loop is bound by the host, well
   below it by the GPU). If fullgraph=True does not compile, the step is compiled again with
   fullgraph=False and the first error recorded; a prefill that flash refuses runs on SDPA's default.
3. **profile**: ``--profile-steps`` further replays under torch.profiler (CUDA activity, after one wait and
   one warm-up step of the profiler's schedule): GPU kernels per step, summed kernel time per step (the GPU
   busy time; memcpy and memset included), the top 10 kernels by total time with their counts, and the time
   in four buckets by kernel name: gemm (matmul/cuBLAS), attention (SDPA's flash / efficient / math
   kernels), recurrent (swaa's fused decode step or Triton step, FLA's recurrent kernels) and other (with a
   breakdown: Inductor's fused Triton kernels, memcpy/memset, the rest). ``busy_over_raw`` above 1 marks a
   suspect trace (CUPTI reports the kernels of CUDA-graph replays).

Between the parts dynamo is reset (each compiles on its own, and the CUDA-graph pools are freed); each model
is freed before the next is built. ``host_overhead_ms`` = generate - raw: what generate's per-step Python
(mask building, logits processing, stopping criteria, input preparation) adds over a bare replay loop.
``floor_ms``: weights + the static cache's bytes (the decode step's SDPA runs masked over all max_cache_len) at
``--hbm-tbps``. ``recompiles``: new dynamo graphs after warm-up (raw: over the timed and profiled replays;
generate: over the timed generate); both must be 0. The raw step's greedy tokens are compared with
generate's (same prompt; a difference after a near-tie is bf16 noise, random weights have many).

Runtime: each part compiles the 28-layer model once (~35-45 s on an H200), so a case takes ~80-100 s and the
four default cases ~6-7 minutes; ``--budget-s`` starts no case (and no generate) that would end after it,
the JSON is rewritten after every case. Cases run context by context (hybrid then Qwen3 at 1k, then at
32k), so a budget cut drops Qwen3 at 32k first.

Usage:
    python benchmarks/profile_compiled_step_gpu.py --out benchmarks/results/profile_compiled_step_gpu_<device>.json
    python benchmarks/profile_compiled_step_gpu.py --models hybrid --contexts 32768
    OMP_NUM_THREADS=1 python benchmarks/profile_compiled_step_gpu.py --smoke   # CPU, tiny model, ~1 min

``--smoke``: a 2-layer model (layer 0 GLA) on CPU, contexts 16 and 64; the step is compiled with dynamo's
eager backend (fullgraph=True, no Inductor, no CUDA graphs), generate with aot_eager, the profiler records
CPU activity (operators and their self time stand in for kernels). Its numbers mean nothing; it proves the script's path.
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import tempfile
import time
import traceback

import torch
from bench_decode_gpu import (
    SMOKE_HYBRID_LAYERS,
    SMOKE_SHAPE,
    CompileLog,
    cache_argument,
    compare_tokens,
    counter_delta,
    dynamo_counters,
    fix_generation_config,
    measure,
    prompt,
    start_compile_log,
    tensor_bytes,
    unique_graphs,
    write_json,
)
from bench_hybrid_gpu import HYBRID_LAYERS, SHAPE, build_model, sdpa_context, versions
from common import progress
from torch.profiler import ProfilerActivity, profile, schedule

MODELS = ("hybrid", "qwen3")
CONTEXTS = (1024, 32768)
SMOKE_CONTEXTS = (16, 64)
CACHE_MARGIN = 8  # static-cache slots beyond the tokens this script writes
# seconds a part is assumed to take before one has run (the budget check): compile ~40 s on an H200
FIRST_GUESS_S = {"build": 15.0, "raw": 50.0, "generate": 50.0}
SMOKE_FIRST_GUESS_S = {"build": 2.0, "raw": 10.0, "generate": 15.0}
TOP = 10

# kernel-name buckets, tested in this order on the lowercased name (recurrent first: a linear-attention
# kernel must not land in attention; attention before gemm: the efficient attention kernel is fmha_cutlass...)
BUCKETS = (
    (
        "recurrent",
        (
            "fused_decode",
            "decode_step",
            "fused_recurrent",
            "recurrent_gla",
            "chunk_gla",
            "gla_fwd",
            "linear_attn",
        ),
    ),
    ("attention", ("flash", "fmha", "attention", "sdpa", "scaled_dot_product", "softmax")),
    (
        "gemm",
        (
            "gemm",
            "gemv",
            "matmul",
            "nvjet",
            "cublas",
            "cutlass",
            "xmma",
            "splitk",
            "triton_tem",
            "aten::mm",
            "aten::addmm",
            "aten::bmm",
            "aten::linear",
        ),
    ),
)
BUCKET_NAMES = tuple(name for name, _ in BUCKETS) + ("other",)


def bucket_of(name: str) -> str:
    low = name.lower()
    for bucket, keys in BUCKETS:
        if any(k in low for k in keys):
            return bucket
    return "other"


def other_kind(name: str) -> str:
    low = name.lower()
    if "memcpy" in low or "memset" in low:
        return "memcpy/memset"
    if low.startswith("triton_"):
        return "inductor fused (triton_poi/red/per)"
    return "rest"


# ---------------------------------------------------------------- models


def build(key: str, shape: dict, device: str, hybrid_layers: str):
    """Qwen3 as bench_decode_gpu builds it, or its hybrid: the same seeded build converted in place (bench
    converts a deep copy of the Qwen3 it keeps; the weights are the same)."""
    model = build_model(shape, device)
    fix_generation_config(model)
    info = None
    if key == "hybrid":
        import swaa

        model = swaa.convert_to_hybrid(model, hybrid_layers, kind="gla")
        fix_generation_config(model)
        info = getattr(model.config, "swaa_hybrid", None)
    return model, info


def param_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())  # a tied matrix once


def sync(cuda: bool) -> None:
    if cuda:
        torch.cuda.synchronize()


def free(cuda: bool) -> None:
    # drops the compiled graphs, their CUDA-graph pools and what they hold on to
    torch._dynamo.reset()
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()


# ---------------------------------------------------------------- 1. the raw compiled step


def make_decode_one_token(model, cache_kw: str):
    def decode_one_token(ids, position_ids, cache):
        # ids, position_ids: [B, 1]; the static cache knows where to write
        logits = model(input_ids=ids, position_ids=position_ids, use_cache=True, **{cache_kw: cache}).logits
        return logits[:, -1].argmax(-1, keepdim=True)  # [B, 1]

    return decode_one_token


def compile_step(fn, args, fullgraph: bool):
    if args.step_backend == "inductor":
        return torch.compile(fn, mode="reduce-overhead", fullgraph=fullgraph)
    return torch.compile(fn, backend=args.step_backend, fullgraph=fullgraph)


def prefill(model, ids, cache, cache_kw: str, flash: bool):
    with sdpa_context(flash):
        logits = model(ids, use_cache=True, logits_to_keep=1, **{cache_kw: cache}).logits
    return logits[:, -1].argmax(-1, keepdim=True)


def kernel_rows(events, cuda: bool) -> list[tuple[str, float]]:
    """(name, us) of every GPU activity (kernels, memcpy, memset); on CPU (--smoke) of every operator,
    by its self time (dynamo's and the profiler's own events have no ``::`` in their names)."""
    if cuda:
        return [(e.name, e.time_range.elapsed_us()) for e in events if e.device_type.name == "CUDA"]
    return [(e.name, e.self_cpu_time_total) for e in events if e.device_type.name == "CPU" and "::" in e.name]


def summarize_kernels(rows: list[tuple[str, float]], steps: int) -> dict:
    per_name: dict[str, list] = {}
    for name, us in rows:
        entry = per_name.setdefault(name, [0, 0.0])
        entry[0] += 1
        entry[1] += us
    buckets = {b: {"us_per_step": 0.0, "kernels_per_step": 0.0} for b in BUCKET_NAMES}
    other: dict[str, dict] = {}
    for name, (count, us) in per_name.items():
        b = bucket_of(name)
        buckets[b]["us_per_step"] += us / steps
        buckets[b]["kernels_per_step"] += count / steps
        if b == "other":
            o = other.setdefault(other_kind(name), {"us_per_step": 0.0, "kernels_per_step": 0.0})
            o["us_per_step"] += us / steps
            o["kernels_per_step"] += count / steps
    busy_us = sum(us for _, us in rows) / steps
    for v in buckets.values():
        v["share"] = v["us_per_step"] / busy_us if busy_us else None
    top = sorted(per_name.items(), key=lambda kv: -kv[1][1])[:TOP]
    copies = sum(1 for name, _ in rows if other_kind(name) == "memcpy/memset")
    return {
        "profiled_steps": steps,
        "activities_total": len(rows),
        "kernels_per_step": (len(rows) - copies) / steps,
        "memcpy_memset_per_step": copies / steps,
        "whole_steps": len(rows) % steps == 0,
        "busy_ms_per_step": busy_us / 1e3,
        "buckets": buckets,
        "other_breakdown": other,
        "top_kernels": [
            {
                "name": name[:240],
                "bucket": bucket_of(name),
                "count_per_step": count / steps,
                "us_per_step": us / steps,
                "us_per_call": us / count,
            }
            for name, (count, us) in top
        ],
    }


def measure_raw(model, key: str, context: int, args, log: CompileLog, row: dict) -> torch.Tensor:
    """Part 1 and 2 into ``row``; returns the greedy tokens [B, n] (prefill's first) on the host."""
    from transformers import StaticCache

    cuda = args.device == "cuda"
    batch = 1
    W, S, R = args.raw_warmup, args.steps, args.profile_steps
    # the profiler's schedule adds 2 replays, the host profile S more
    max_len = context + W + S * (2 if args.host_profile else 1) + R + 2 + CACHE_MARGIN
    cache_kw = cache_argument(model)
    ids_prompt = prompt(batch, context, model.config.vocab_size, args.device)
    cache = StaticCache(config=model.config, max_cache_len=max_len)
    row.update(max_cache_len=max_len, cache_argument=cache_kw)

    def start(fullgraph: bool):
        """Prefill, then the compiled step's first call; returns (step, first ids, positions)."""
        cache.reset()
        t0 = time.perf_counter()
        try:
            first = prefill(model, ids_prompt, cache, cache_kw, flash=not args.no_flash)
            row["prefill_sdpa"] = "default" if args.no_flash else "flash (forced)"
        except RuntimeError as err:  # no flash kernel for this call: the default backend, said so
            cache.reset()
            first = prefill(model, ids_prompt, cache, cache_kw, flash=False)
            row["prefill_sdpa"] = f"default (flash refused: {type(err).__name__}: {err})"[:400]
        sync(cuda)
        row["prefill_s"] = time.perf_counter() - t0
        step = compile_step(make_decode_one_token(model, cache_kw), args, fullgraph)
        pos = torch.full((batch, 1), context, dtype=torch.long, device=args.device)
        t0 = time.perf_counter()
        torch.compiler.cudagraph_mark_step_begin()
        nxt = step(first, pos, cache).clone()
        pos += 1
        sync(cuda)
        row["first_call_s"] = time.perf_counter() - t0
        return step, [first, nxt], pos

    before = dynamo_counters()
    log.take()
    try:
        step, tokens, pos = start(fullgraph=True)
        row["fullgraph"] = True
    except Exception as err:  # noqa: BLE001 (recorded; the step is compiled again without fullgraph)
        row["fullgraph_error"] = f"{type(err).__name__}: {err}"[:3000]
        row["fullgraph_log"] = log.take()
        progress(f"{key} {context}: fullgraph=True failed ({row['fullgraph_error'][:200]}); fullgraph=False")
        free(cuda)
        step, tokens, pos = start(fullgraph=False)
        row["fullgraph"] = False

    def once():
        torch.compiler.cudagraph_mark_step_begin()
        tokens.append(step(tokens[-1], pos, cache).clone())
        pos.add_(1)

    # warm-up: the first call compiled (and ran without a graph under reduce-overhead), the second records
    # the CUDA graph, the rest replay
    t0 = time.perf_counter()
    for _ in range(W - 1):
        once()
    sync(cuda)
    row["warmup_s"] = row["first_call_s"] + time.perf_counter() - t0
    row["warmup_counters"] = counter_delta(before, dynamo_counters())
    row["cudagraph_skips"] = row["warmup_counters"].get("inductor", {}).get("cudagraph_skips", 0)
    row["warmup_log"] = log.take()

    graphs = unique_graphs()
    before = dynamo_counters()
    # host_ms: the host's time to issue the steps (before the final sync); near raw_ms the loop is bound
    # by the host, well below it by the GPU
    t0 = time.perf_counter()
    if cuda:
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(S):
            once()
        b.record()
        host_s = time.perf_counter() - t0
        b.synchronize()
        total_ms = a.elapsed_time(b)
    else:
        for _ in range(S):
            once()
        host_s = time.perf_counter() - t0
        total_ms = 1e3 * host_s
    row["timed_steps"] = S
    row["raw_ms_per_step"] = total_ms / S
    row["host_issue_ms_per_step"] = 1e3 * host_s / S
    if args.host_profile:
        row["host_profile"] = profile_host(once, S, cuda)

    # profile: the same loop, one wait and one warm-up step (the profiler may drop a session's first
    # events), then R recorded; a sync after each step so the last one's kernels are in the trace
    activity = ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU
    try:
        with profile(activities=[activity], schedule=schedule(wait=1, warmup=1, active=R, repeat=1)) as prof:
            for _ in range(R + 2):
                once()
                sync(cuda)
                prof.step()
        rows = kernel_rows(prof.events(), cuda)
        row["profile"] = summarize_kernels(rows, R) if rows else {"error": "the profiler recorded no kernels"}
    except Exception as err:  # noqa: BLE001 (the timing stands; the profile says why it is missing)
        row["profile"] = {
            "error": f"{type(err).__name__}: {err}"[:2000],
            "traceback": traceback.format_exc()[-4000:],
        }
    busy = row["profile"].get("busy_ms_per_step")
    if busy is not None:
        # above 1 the trace is suspect (kernels of CUDA graphs are reported by CUPTI, not timed here)
        row["profile"]["busy_over_raw"] = busy / row["raw_ms_per_step"]
    row["recompiles_after_warmup"] = unique_graphs() - graphs
    row["timed_counters"] = counter_delta(before, dynamo_counters())
    row["timed_log"] = log.take()
    row["cache_bytes"] = tensor_bytes(cache)
    return torch.cat(tokens, dim=1).cpu()


def profile_host(once, steps: int, cuda: bool, top: int = 30) -> dict:
    """Where the host's time to issue a step goes: the Python functions of ``steps`` more steps under
    cProfile (C-level work, dynamo's guards among it, counts in the frame that calls it), per step."""
    import cProfile
    import pstats

    prof = cProfile.Profile()
    prof.enable()
    for _ in range(steps):
        once()
    prof.disable()
    sync(cuda)
    # (file, line, name) -> (calls, primitive calls, tottime, cumtime, callers)
    stats = pstats.Stats(prof).stats
    rows = [
        {
            "function": f"{os.path.relpath(f) if f.startswith('/') else f}:{line}({name})"[-160:],
            "calls_per_step": nc / steps,
            "self_us_per_step": 1e6 * tt / steps,
            "cumulative_us_per_step": 1e6 * ct / steps,
        }
        for (f, line, name), (_, nc, tt, ct, _) in stats.items()
    ]
    return {
        "steps": steps,
        "python_calls_per_step": sum(r["calls_per_step"] for r in rows),
        "by_self_time": sorted(rows, key=lambda r: -r["self_us_per_step"])[:top],
        "by_cumulative_time": sorted(rows, key=lambda r: -r["cumulative_us_per_step"])[:top],
    }


# ---------------------------------------------------------------- one case


def run_case(key: str, model, context: int, args, state: dict) -> dict:
    """generate() first (no profiler has run in its case yet), then the raw step and its profile."""
    cuda = args.device == "cuda"
    row = {"model": key, "context": context, "batch": 1, "status": "ok"}
    started = time.perf_counter()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    durations, guess = state["durations"], state["guess"]

    gen = {"status": "ok"}
    row["generate"] = gen
    gen_tokens = None
    need = durations.get("generate", guess["generate"]) + durations.get("raw", guess["raw"])
    if args.skip_generate:
        gen.update(status="skipped", reason="--skip-generate")
    elif time.perf_counter() + need > state["budget_end"]:
        # the raw step is what this script adds: it keeps the time
        gen.update(status="skipped", reason=f"time budget: generate and the raw step take ~{need:.0f} s")
    else:
        state["log"].take()
        try:
            with torch.no_grad():
                gen_tokens, _ = measure(
                    model, f"{key}_compiled", 1, context, state["gen_args"], state["gen_run"], gen
                )
        except Exception as err:  # noqa: BLE001 (recorded; the raw step still runs)
            gen.update(
                status="error",
                error=f"{type(err).__name__}: {err}"[:3000],
                traceback=traceback.format_exc()[-6000:],
            )
            row["status"] = "error"
        finally:
            gen["compile_log"] = state["log"].take()
            gen["wall_s"] = time.perf_counter() - started
            durations["generate"] = gen["wall_s"]
            free(cuda)

    raw = {"status": "ok"}
    row["raw"] = raw
    t0 = time.perf_counter()
    try:
        with torch.no_grad():
            raw_tokens = measure_raw(model, key, context, args, state["log"], raw)
        raw["floor_ms"] = 1e3 * (param_bytes(model) + raw["cache_bytes"]) / (args.hbm_tbps * 1e12)
        if gen_tokens is not None:
            n = min(raw_tokens.shape[1], gen_tokens.shape[1])
            row["raw_tokens_vs_generate"] = compare_tokens(raw_tokens[:, :n], gen_tokens[:, :n])
    except Exception as err:  # noqa: BLE001 (recorded)
        raw.update(
            status="error",
            error=f"{type(err).__name__}: {err}"[:3000],
            traceback=traceback.format_exc()[-6000:],
        )
        row["status"] = "error"
    finally:
        raw["wall_s"] = time.perf_counter() - t0
        durations["raw"] = raw["wall_s"]
        free(cuda)

    if raw.get("raw_ms_per_step") is not None and gen.get("decode_ms_per_step") is not None:
        row["host_overhead_ms"] = gen["decode_ms_per_step"] - raw["raw_ms_per_step"]
    row["peak_memory_bytes"] = torch.cuda.max_memory_allocated() if cuda else None
    row["wall_s"] = time.perf_counter() - started
    return row


# ---------------------------------------------------------------- report


def fmt(x, spec=".2f", width=8) -> str:
    return f"{x:>{width}{spec}}" if isinstance(x, (int, float)) else f"{'-':>{width}}"


def print_case(row: dict) -> None:
    raw, gen = row["raw"], row["generate"]
    head = f"{row['model']} @ {row['context']}"
    if raw["status"] != "ok":
        progress(f"{head}: raw step {raw['status']}: {raw.get('error', '')[:300]}")
    else:
        p = raw["profile"]
        progress(
            f"{head}: raw {raw['raw_ms_per_step']:.3f} ms/step, host issues a step in "
            f"{raw['host_issue_ms_per_step']:.3f} ms (fullgraph={raw['fullgraph']}, "
            f"recompiles {raw['recompiles_after_warmup']}, cudagraph skips {raw['cudagraph_skips']}, "
            f"first call {raw['first_call_s']:.1f} s)"
        )
        if "error" in p:
            progress(f"  profile: {p['error']}")
        else:
            progress(
                f"  GPU busy {p['busy_ms_per_step']:.3f} ms/step, {p['kernels_per_step']:.1f} kernels "
                f"+ {p['memcpy_memset_per_step']:.1f} memcpy/memset per step (busy / raw "
                f"{p['busy_over_raw']:.2f}); floor {raw['floor_ms']:.3f} ms"
            )
            for b in BUCKET_NAMES:
                v = p["buckets"][b]
                progress(
                    f"    {b:<10} {v['us_per_step'] / 1e3:8.3f} ms  {v['kernels_per_step']:7.1f} kernels"
                )
            for name, v in p["other_breakdown"].items():
                progress(
                    f"      other: {name:<36} {v['us_per_step'] / 1e3:7.3f} ms {v['kernels_per_step']:7.1f}"
                )
            for k in p["top_kernels"]:
                progress(
                    f"    {k['us_per_step']:9.1f} us {k['count_per_step']:6.1f}x {k['bucket']:<9} {k['name'][:110]}"
                )
        hp = raw.get("host_profile")
        if hp:
            progress(
                f"  host, per step under cProfile: {hp['python_calls_per_step']:.0f} Python calls; by self time:"
            )
            for r in hp["by_self_time"][:12]:
                progress(
                    f"    {r['self_us_per_step']:8.1f} us self {r['cumulative_us_per_step']:8.1f} us cum "
                    f"{r['calls_per_step']:6.1f}x  {r['function'][-100:]}"
                )
    if gen["status"] == "ok":
        progress(
            f"{head}: generate {gen['decode_ms_per_step']:.3f} ms/step (median), recompiles "
            f"{gen['recompiles_after_warmup']}, tokens vs raw {row.get('raw_tokens_vs_generate')}"
        )
    else:
        progress(f"{head}: generate {gen['status']}: {(gen.get('reason') or gen.get('error') or '')[:300]}")


def print_table(record: dict) -> None:
    print()
    print(f"device: {record['device']}  versions: {record['versions']}")
    print("raw step's GPU busy ms per step by kernel bucket (kernels per step)")
    print(f"{'model':<7} {'context':>7} " + " ".join(f"{b:>16}" for b in BUCKET_NAMES))
    for r in record["results"]:
        buckets = ((r.get("raw") or {}).get("profile") or {}).get("buckets")
        if buckets:
            cells = " ".join(
                f"{buckets[b]['us_per_step'] / 1e3:>8.3f} ({buckets[b]['kernels_per_step']:>5.0f})"
                for b in BUCKET_NAMES
            )
            print(f"{r['model']:<7} {r['context']:>7} {cells}")
    print()
    print(
        "B=1, ms per decode step. generate: generate()'s median; raw: the compiled step replayed in a bare "
        "loop; issue: the host's time to issue one raw step; busy: summed GPU kernel time of one raw step; "
        "floor: weights + static cache at --hbm-tbps; host: generate - raw"
    )
    print(
        f"{'model':<7} {'context':>7} {'generate':>8} {'raw':>8} {'issue':>8} {'busy':>8} {'floor':>8} "
        f"{'kernels':>8} {'host':>8} {'recomp raw/gen':>15}"
    )
    for r in record["results"]:
        raw, gen = r.get("raw", {}), r.get("generate", {})
        if r["status"] == "skipped":
            print(f"{r['model']:<7} {r['context']:>7} skipped: {r.get('reason', '')[:100]}")
            continue
        prof = raw.get("profile") or {}
        recomp = f"{raw.get('recompiles_after_warmup', '-')}/{gen.get('recompiles_after_warmup', '-')}"
        print(
            f"{r['model']:<7} {r['context']:>7} {fmt(gen.get('decode_ms_per_step'))} "
            f"{fmt(raw.get('raw_ms_per_step'))} {fmt(raw.get('host_issue_ms_per_step'))} "
            f"{fmt(prof.get('busy_ms_per_step'))} {fmt(raw.get('floor_ms'))} "
            f"{fmt(prof.get('kernels_per_step'), '.0f')} {fmt(r.get('host_overhead_ms'))} {recomp:>15}"
        )
        for part, d in (("raw", raw), ("generate", gen)):
            if d.get("status") not in (None, "ok"):
                print(f"{'':<16}{part} {d['status']}: {(d.get('error') or d.get('reason') or '')[:100]}")
        if "error" in prof:
            print(f"{'':<16}profile: {prof['error'][:100]}")


# ---------------------------------------------------------------- main


def parse_contexts(text: str) -> list[int]:
    out = []
    for item in (t.strip().lower() for t in text.split(",") if t.strip()):
        try:
            out.append(int(item[:-1]) * 1024 if item.endswith("k") else int(item))
        except ValueError:
            raise SystemExit(f"--contexts: {item!r} is not a token count (e.g. 1024 or 32k)") from None
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--out",
        default=None,
        help="JSON path (default benchmarks/results/profile_compiled_step_gpu_<device>.json; --smoke: temp dir)",
    )
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, from {list(MODELS)}")
    parser.add_argument(
        "--contexts",
        default=None,
        help=f"comma-separated token counts (default {','.join(map(str, CONTEXTS))})",
    )
    parser.add_argument("--steps", type=int, default=50, help="timed replays of the raw step")
    parser.add_argument(
        "--raw-warmup", type=int, default=5, help="raw step calls before the timed ones (>= 3)"
    )
    parser.add_argument(
        "--profile-steps", type=int, default=3, help="raw step replays recorded by the profiler"
    )
    parser.add_argument("--gen-steps", type=int, default=32, help="timed decode steps of the timed generate")
    parser.add_argument(
        "--gen-warmup", type=int, default=8, help="generate's decode steps before the timed ones"
    )
    parser.add_argument("--skip-generate", action="store_true", help="only the raw step and its profile")
    parser.add_argument(
        "--no-host-profile",
        dest="host_profile",
        action="store_false",
        help="skip the cProfile of the host's work per raw step (host_profile in each row)",
    )
    parser.add_argument(
        "--budget-s", type=float, default=540.0, help="start no case or part that would end after this"
    )
    parser.add_argument("--case-limit-s", type=float, default=200.0, help="stop a generate running longer")
    parser.add_argument(
        "--hbm-tbps", type=float, default=4.8, help="memory bandwidth for floor_ms (H200: 4.8)"
    )
    parser.add_argument(
        "--step-backend",
        default=None,
        help="the raw step's torch.compile backend: inductor (default; mode reduce-overhead), eager with --smoke",
    )
    parser.add_argument(
        "--no-flash", action="store_true", help="leave SDPA's backend choice alone in the prefill"
    )
    parser.add_argument("--device", default=None, help="cuda (default), or cpu with --smoke")
    parser.add_argument(
        "--smoke", action="store_true", help="CPU, tiny 2-layer model, short contexts, few steps"
    )
    args = parser.parse_args()

    if args.smoke:
        args.device = args.device or "cpu"
        args.steps = min(args.steps, 4)
        args.gen_steps = min(args.gen_steps, 4)
        args.gen_warmup = min(args.gen_warmup, 2)
        args.profile_steps = min(args.profile_steps, 2)
    args.device = args.device or "cuda"
    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        raise SystemExit(
            "profile_compiled_step_gpu: needs a CUDA GPU (or --smoke for a CPU run of the script)"
        )
    args.step_backend = args.step_backend or ("inductor" if cuda else "eager")
    if args.raw_warmup < 3:
        raise SystemExit("--raw-warmup: at least 3 (compile, CUDA-graph record, a replay)")
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    if not models or set(models) - set(MODELS):
        raise SystemExit(f"--models: {models} is not a selection from {list(MODELS)}")
    contexts = parse_contexts(args.contexts or ",".join(map(str, SMOKE_CONTEXTS if args.smoke else CONTEXTS)))
    device_name = torch.cuda.get_device_name() if cuda else (platform.processor() or "cpu")
    folder = (
        os.path.join(tempfile.gettempdir(), "profile_compiled_smoke") if args.smoke else "benchmarks/results"
    )
    out = args.out or os.path.join(folder, f"profile_compiled_step_gpu_{device_name.replace(' ', '_')}.json")
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    shape = SMOKE_SHAPE if args.smoke else SHAPE
    hybrid_layers = SMOKE_HYBRID_LAYERS if args.smoke else HYBRID_LAYERS
    start = time.perf_counter()

    from transformers.generation.configuration_utils import CompileConfig

    # generate's compile as bench_decode_gpu configures it by default (aot_eager and every device in --smoke)
    compile_config = CompileConfig(backend="aot_eager", mode=None) if args.smoke else CompileConfig()
    if not cuda:
        compile_config._compile_all_devices = True
    log = start_compile_log()

    record = {
        "benchmark": "profile_compiled_step_gpu",
        "status": "running",
        "device": device_name,
        "versions": versions(),
        "args": vars(args),
        "shape": {**shape, "dtype": "bfloat16"},
        "hybrid_layers": hybrid_layers,
        "hybrid": None,
        "generate_compile_config": compile_config.to_dict(),
        "timing": {
            "raw": "CUDA events around --steps replays of the compiled step (argmax fed back, no host sync); "
            "total / steps (host clock on CPU)",
            "busy": "summed duration of the GPU activities (kernels, memcpy, memset) of --profile-steps "
            "replays under torch.profiler, per step",
            "generate": "bench_decode_gpu.measure: median of the CUDA-event intervals between tokens of a timed "
            "generate after its warm-up generate",
        },
        "results": [],
    }
    guess = dict(SMOKE_FIRST_GUESS_S if args.smoke else FIRST_GUESS_S)
    state = {
        "log": log,
        "durations": {},
        "guess": guess,
        "budget_end": start + args.budget_s,
        "gen_args": argparse.Namespace(
            device=args.device,
            warmup=args.gen_warmup,
            steps=args.gen_steps,
            case_limit_s=args.case_limit_s,
            no_flash=args.no_flash,
        ),
        "gen_run": {
            "vocab": shape["vocab_size"],
            "compile_config": compile_config,
            "budget_end": start + args.budget_s,
        },
    }
    write_json(record, out)

    current_key, model = None, None
    for context in contexts:
        for key in models:
            durations = state["durations"]
            need = durations.get("raw", guess["raw"]) + (
                0 if args.skip_generate else durations.get("generate", guess["generate"])
            )
            if key != current_key:
                need += durations.get("build", guess["build"])
            left = state["budget_end"] - time.perf_counter()
            if need > left:
                row = {"model": key, "context": context, "batch": 1, "status": "skipped"}
                row["reason"] = f"time budget: {left:.0f} s left, this case takes ~{need:.0f} s"
                record["results"].append(row)
                progress(f"{key} @ {context}: skipped ({row['reason']})")
                write_json(record, out)
                continue
            if key != current_key:
                # each model is freed before the next is built
                model = None
                free(cuda)
                t0 = time.perf_counter()
                model, info = build(key, shape, args.device, hybrid_layers)
                current_key = key
                durations["build"] = time.perf_counter() - t0
                if info is not None:
                    record["hybrid"] = info
                progress(
                    f"{key} built in {durations['build']:.1f} s ({param_bytes(model) / 1e9:.2f} GB of weights)"
                )
            progress(f"{key} @ {context}: running")
            record["running"] = f"{key}@{context}"
            write_json(record, out)
            row = run_case(key, model, context, args, state)
            record["results"].append(row)
            print_case(row)
            record["wall_s"] = time.perf_counter() - start
            write_json(record, out)
    model = None
    free(cuda)

    record["status"] = "done"
    record.pop("running", None)
    record["wall_s"] = time.perf_counter() - start
    write_json(record, out)
    print_table(record)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
