"""Decode speed, eager and compiled (issue 10): a Qwen3-1.7B-shaped model, its every:4 GLA hybrid, FLA's GLA.

Random weights (the speed does not depend on them), bf16, all in one process on one GPU. Variants:

    qwen3_eager      Qwen3, DynamicCache, SDPA forced to the flash backend
    hybrid_eager     swaa.convert_to_hybrid(copy of that model, "every:4", kind="gla"): 21 of 28 layers GLA,
                     the 7 softmax layers on SDPA flash, DynamicCache
    qwen3_compiled   Qwen3 through generate(cache_implementation="static"): transformers compiles the
                     decode step itself (CompileConfig: mode="reduce-overhead", i.e. CUDA graphs); SDPA
                     picks its own backend (flash takes no mask, and a static cache always has one)
    hybrid_compiled  the same for the hybrid
    fla_gla          fla.models.GLAForCausalLM of the same size (all 28 layers GLA, 16 heads of 128,
                     intermediate 6144, output matrix untied), FLA's own cache and generate: an outside
                     anchor (skipped with the reason where fla does not import)

Points (BxCTX, run in this order, the verdicts' points first): 1x1k, 1x32k, 64x8k, 1x8k, 64x2k, 16x8k.

Everything is measured through ``generate()``, the user's path. Per point and variant: a warm-up generate
of the same shape (compiles, records the CUDA graphs, lets FLA autotune), then a timed one. A stopping
criterion records a CUDA event after every token, so

- ``prefill_ms``: generate's start to the first token (prompt forward and first greedy pick);
- ``decode_ms_per_step``: median of the intervals between tokens after ``--warmup`` steps, over ``--steps``
  steps (generate's own per-step host work included); ``tokens_per_s`` = B / step time;
- ``recompiles_after_warmup``: new dynamo graphs during the timed generate (must be 0);
- ``cache_bytes``: every tensor the returned cache holds (a static cache counts its full allocation);
- ``peak_memory_bytes``: torch.cuda.max_memory_allocated over the case (reset at its start).

The compiled variant re-uses the static cache its warm-up built (reset in between, so the timed run has
the same addresses and needs no new graph), sized for this point only: generate() otherwise keeps the
largest size it has seen on the model. Dynamo is reset after each compiled case, so each case compiles
once for its own shapes, as a user's first call would (``--compile-dynamic true`` instead compiles once with
dynamic shapes for all points, cheaper but not the default path). A generate that recompiles at every
decode step is stopped after its third compile and recorded as an error (each costs tens of seconds).

Checks: the greedy tokens of a compiled run against the eager run of the same model and prompt (equal, or
how many leading tokens agree); and for every run, row 0's tokens scored by the eager model in one
teacher-forced forward: ``max_gap`` is how far (in logits) a chosen token falls below that forward's best.
Random weights leave near-ties that bf16 noise flips, so a differing token with a small gap is numerics, a
gap above ``--tf-tol`` a real disagreement. A speed verdict passes only if its runs pass these checks.

A point that would not fit in memory (estimated from KV bytes, states and prefill activations) is skipped
with the estimate; a case that would run past ``--budget-s`` is skipped; a failing case records its error
and the others go on. JSON is rewritten after every case; a PNG (tokens/s against context, B=1 and B=64
panels) goes next to it when matplotlib imports.

Usage:
    python benchmarks/bench_decode_gpu.py --out benchmarks/results/decode_gpu_<device>.json
    python benchmarks/bench_decode_gpu.py --points 1x1k,64x8k --variants qwen3_compiled,hybrid_compiled
    OMP_NUM_THREADS=1 python benchmarks/bench_decode_gpu.py --smoke     # CPU, tiny model, ~40 s
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import json
import logging
import os
import platform
import re
import statistics
import tempfile
import time
import traceback

import torch
from bench_hybrid_gpu import HYBRID_LAYERS, SHAPE, TINY_SHAPE, build_model, sdpa_context, versions
from common import progress

from swaa.layers.host_inputs import cache_argument

# name -> (batch, context); the order is the default run order: the points the verdicts need come first
POINTS = {
    "1x1k": (1, 1024),
    "1x32k": (1, 32768),
    "64x8k": (64, 8192),
    "1x8k": (1, 8192),
    "64x2k": (64, 2048),
    "16x8k": (16, 8192),
}
# the same names at toy sizes, plus one point whose estimate cannot fit (exercises the memory skip)
SMOKE_POINTS = {
    "1x1k": (1, 16),
    "1x32k": (1, 64),
    "64x8k": (4, 32),
    "1x8k": (1, 32),
    "64x2k": (4, 16),
    "16x8k": (2, 32),
    "oversize": (8, 1 << 20),
}
SMOKE_DEFAULT_POINTS = "1x1k,1x32k,64x8k,oversize"
SMOKE_SHAPE = dict(TINY_SHAPE, num_hidden_layers=2)
SMOKE_HYBRID_LAYERS = "every:2"  # two layers: layer 0 GLA, layer 1 softmax

# variant -> (model, compiled)
VARIANTS = {
    "qwen3_eager": ("qwen3", False),
    "hybrid_eager": ("hybrid", False),
    "qwen3_compiled": ("qwen3", True),
    "hybrid_compiled": ("hybrid", True),
    "fla_gla": ("fla", False),
}
# seconds a case is assumed to take before a case of its variant has run (the budget check)
FIRST_GUESS_S = {False: 20.0, True: 100.0}
SMOKE_FIRST_GUESS_S = {False: 2.0, True: 10.0}
MAX_LOGGED = 20  # compile-related log lines kept per case


# ---------------------------------------------------------------- models


def fix_generation_config(model) -> None:
    # no EOS (every run generates exactly max_new_tokens), an explicit pad id (prompts never contain it)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0


def build_fla(shape: dict, device: str):
    """FLA's GLA language model of the same size; raises ImportError where fla does not import."""
    from fla.models import GLAConfig, GLAForCausalLM

    config = GLAConfig(
        hidden_size=shape["hidden_size"],
        expand_k=1.0,
        expand_v=1.0,
        num_heads=shape["num_attention_heads"],
        intermediate_size=shape["intermediate_size"],
        num_hidden_layers=shape["num_hidden_layers"],
        vocab_size=shape["vocab_size"],
        # untied: FLA's list-style _tied_weights_keys predates transformers 5's mapping; a decode step reads
        # the output matrix either way
        tie_word_embeddings=False,
        max_position_embeddings=shape["max_position_embeddings"],
        attn_mode="chunk",
        use_cache=True,
    )
    torch.manual_seed(0)
    with torch.device(device):
        model = GLAForCausalLM(config).to(torch.bfloat16).eval()
    return model


def output_cache(out):
    for name in ("cache", "past_key_values"):
        cache = getattr(out, name, None)
        if cache is not None:
            return cache
    return None


def tensor_bytes(obj) -> int:
    """Bytes of the storages of every tensor reachable from a cache object (each storage counted once)."""
    seen_storage, seen_obj, total = set(), set(), 0
    stack = [(obj, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, torch.Tensor):
            if item.device.type == "meta":
                continue
            storage = item.untyped_storage()
            key = (item.device, storage.data_ptr())
            if key not in seen_storage:
                seen_storage.add(key)
                total += storage.nbytes()
            continue
        if (
            depth > 6
            or id(item) in seen_obj
            or isinstance(item, (str, bytes, int, float, bool, torch.nn.Module))
        ):
            continue
        seen_obj.add(id(item))
        if isinstance(item, dict):
            children = item.values()
        elif isinstance(item, (list, tuple, set)):
            children = item
        elif type(item).__module__.startswith(("transformers.cache_utils", "fla", "swaa")) and hasattr(
            item, "__dict__"
        ):
            children = vars(item).values()  # cache and layer objects (configs are never walked)
        else:
            continue
        stack.extend((child, depth + 1) for child in children)
    return total


# ---------------------------------------------------------------- memory


def estimate_bytes(
    model_key: str, compiled: bool, batch: int, context: int, new: int, shape: dict, linear: int
):
    """What a case allocates beyond the resident weights: the cache at its largest plus the prefill's
    transient activations (an upper-end estimate: a layer's worth of intermediates, float32 where the GLA
    kernels use it, the mask of a static-cache prefill)."""
    L, H, Hk, D = (
        shape[k] for k in ("num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim")
    )
    hidden, inter = shape["hidden_size"], shape["intermediate_size"]
    softmax = {"qwen3": L, "hybrid": L - linear, "fla": 0}[model_key]
    recurrent = {"qwen3": 0, "hybrid": linear, "fla": L}[model_key]
    kv = batch * (context + new) * softmax * 2 * Hk * D * 2  # bf16 keys + values
    state = batch * recurrent * H * D * D * 4  # float32 [B, H, K, V] per linear layer
    per_token = 2 * (8 * hidden + 3 * inter)
    if recurrent:
        per_token += 4 * 4 * H * D + H * D * D * 4 // 64  # q/k/v/gate float32, chunk states (chunks of 64)
    transient = batch * context * per_token
    if compiled:
        # the prefill's bool mask, SDPA's additive bf16 copy of it and that copy padded for its kernel
        transient += batch * context * (context + new) * 5
    elif softmax:
        transient += kv // softmax  # DynamicCache's torch.cat keeps one layer twice for a moment
    return {"cache": kv + state, "transient": transient, "total": kv + state + transient}


def memory_limit(device: str, override_gb: float | None) -> int | None:
    if override_gb is not None:
        return int(override_gb * 1e9)
    if device == "cuda":
        return int(0.94 * torch.cuda.mem_get_info()[1])
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def resident_bytes(device: str, models: dict) -> int:
    if device == "cuda":
        return torch.cuda.memory_allocated()
    return sum(p.numel() * p.element_size() for m in models.values() if m is not None for p in m.parameters())


# ---------------------------------------------------------------- compile bookkeeping


def dynamo_counters() -> dict:
    from torch._dynamo.utils import counters

    return {k: dict(v) for k, v in counters.items()}


def counter_delta(before: dict, after: dict) -> dict:
    out = {}
    for group, values in after.items():
        for name, value in values.items():
            d = value - before.get(group, {}).get(name, 0)
            if d:
                out.setdefault(group, {})[str(name)[:200]] = d
    return out


def unique_graphs() -> int:
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


class CompileLog(logging.Handler):
    """Keeps torch's log lines about recompiles, graph breaks and CUDA graphs (skips, re-records)."""

    KEYWORDS = ("cudagraph", "recompil", "graph break", "graph_break", "guard")

    def __init__(self):
        super().__init__(level=logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record):
        try:
            msg = record.getMessage()
        except Exception:  # noqa: BLE001 (a log line must never break a run)
            return
        if any(k in msg.lower() for k in self.KEYWORDS) and len(self.lines) < MAX_LOGGED:
            self.lines.append(msg[:1200])

    def attach(self) -> None:
        # torch's loggers stop propagating at each one its logging setup configured: hang on every stop
        loggers = [logging.getLogger("torch")] + [
            lg
            for name, lg in logging.root.manager.loggerDict.items()
            if isinstance(lg, logging.Logger) and name.startswith("torch.") and not lg.propagate
        ]
        for lg in loggers:
            if self not in lg.handlers:
                lg.addHandler(self)

    def take(self) -> list[str]:
        lines, self.lines = self.lines, []
        return lines


def start_compile_log() -> CompileLog:
    """A CompileLog attached to torch's recompile, graph-break and perf-hint logs, with dynamo's recompile
    limit out of reach: a limit hit falls back to eager silently, and the scripts' own step timers stop a
    run that recompiles at every step instead."""
    limit_name = "recompile_limit" if hasattr(torch._dynamo.config, "recompile_limit") else "cache_size_limit"
    setattr(torch._dynamo.config, limit_name, 32)
    log = CompileLog()
    with contextlib.suppress(Exception):
        torch._logging.set_logs(recompiles=True, graph_breaks=True, perf_hints=True)
    log.attach()
    return log


# ---------------------------------------------------------------- timing


def make_step_timer(cuda: bool, deadline: float, watch_compiles: bool):
    from transformers import StoppingCriteria

    class StepTimer(StoppingCriteria):
        """Records a timestamp after each new token (CUDA event, or host clock on CPU) and stops generate
        early (all rows done) when the case runs past its deadline or recompiles at every step."""

        def __init__(self):
            self.marks, self.graphs, self.stop_reason = [], [], None
            self.start = self._mark()
            self.graphs_at_start = unique_graphs()

        @staticmethod
        def _mark():
            if not cuda:
                return time.perf_counter()
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event

        def __call__(self, input_ids, scores, **kwargs):
            self.marks.append(self._mark())
            self.graphs.append(unique_graphs())
            if self.stop_reason is None:
                # decode steps after the first that made new graphs: two means it recompiles as it goes
                # (each compile of the full model costs tens of seconds, so stop before a third)
                steps_compiling = sum(1 for a, b in zip(self.graphs[1:], self.graphs[2:]) if b > a)
                if time.perf_counter() > deadline:
                    self.stop_reason = f"stopped after {len(self.marks)} tokens: past the case's deadline"
                elif watch_compiles and steps_compiling >= 2:
                    self.stop_reason = (
                        f"stopped after {len(self.marks)} tokens: dynamo made new graphs at {steps_compiling} "
                        f"decode steps (graphs per token: {self.graphs})"
                    )
            return torch.full(
                (input_ids.shape[0],), self.stop_reason is not None, dtype=torch.bool, device=input_ids.device
            )

        def intervals_ms(self) -> tuple[float, list[float]]:
            """(start to first token, [token i-1 to token i for i >= 1]) in ms."""
            if cuda:
                torch.cuda.synchronize()
                first = self.start.elapsed_time(self.marks[0])
                steps = [a.elapsed_time(b) for a, b in zip(self.marks, self.marks[1:])]
            else:
                first = 1e3 * (self.marks[0] - self.start)
                steps = [1e3 * (b - a) for a, b in zip(self.marks, self.marks[1:])]
            return first, steps

    return StepTimer()


def compare_tokens(a: torch.Tensor, b: torch.Tensor) -> dict:
    """Greedy tokens ``[B, n]`` of two runs: equal, and how far each row agrees from its start."""
    n = min(a.shape[1], b.shape[1])
    eq = (a[:, :n] == b[:, :n]).cpu()
    first_diff = torch.where(eq.all(1), torch.full((eq.shape[0],), n), (~eq).int().argmax(1))
    return {
        "tokens_equal": bool(eq.all()) and a.shape == b.shape,
        "rows_equal_fraction": float(eq.all(1).float().mean()),
        "min_prefix_match": int(first_diff.min()),
        "steps_compared": n,
    }


@torch.no_grad()
def teacher_forced(model, sequence: torch.Tensor, context: int, tol: float) -> dict:
    """Row 0's generated tokens scored by the eager model in one forward over prompt + tokens."""
    n = sequence.shape[0] - context
    logits = model(sequence[None], use_cache=False, logits_to_keep=n + 1).logits[0, :-1].float()
    chosen = logits.gather(-1, sequence[context:, None])[:, 0]
    gap = logits.max(-1).values - chosen
    over = (gap > tol).nonzero()
    return {
        "max_gap": float(gap.max()),
        "argmax_equal_fraction": float((logits.argmax(-1) == sequence[context:]).float().mean()),
        "first_step_over_tol": int(over[0, 0]) if len(over) else None,
        "logit_std": float(logits.std()),
        "tol": tol,
        "consistent": bool(gap.max() <= tol),
    }


# ---------------------------------------------------------------- one case


def prompt(batch: int, context: int, vocab: int, device: str) -> torch.Tensor:
    g = torch.Generator(device="cpu").manual_seed(1000 * batch + context)
    # ids from 1 on: 0 is the pad id
    return torch.randint(1, vocab, (batch, context), generator=g).to(device)


def measure(model, variant: str, batch: int, context: int, args, run: dict, row: dict):
    """Warm-up generate, then the timed one. Writes the measurements into ``row`` as they come (a run that
    fails keeps what it had) and returns (generated tokens [B, n] on the host, row 0's whole sequence)."""
    model_key, compiled = VARIANTS[variant]
    cuda = args.device == "cuda"
    ids = prompt(batch, context, run["vocab"], args.device)
    new = args.warmup + args.steps + 1  # the first token comes from the prefill
    name = cache_argument(model)
    kwargs = dict(
        attention_mask=torch.ones_like(ids),
        max_new_tokens=new,
        do_sample=False,
        return_dict_in_generate=True,
    )
    if compiled:
        kwargs["compile_config"] = run["compile_config"]
    else:
        kwargs["disable_compile"] = True
    force_flash = model_key != "fla" and not compiled and not args.no_flash
    deadline = time.perf_counter() + min(
        args.case_limit_s, max(30.0, run["budget_end"] - time.perf_counter())
    )
    row["sdpa_backend"] = "flash (forced)" if force_flash else "default"

    def generate(timer, **extra):
        from transformers import StoppingCriteriaList

        with sdpa_context(force_flash):
            return model.generate(ids, stopping_criteria=StoppingCriteriaList([timer]), **kwargs, **extra)

    # warm-up: same shape; compiles and records CUDA graphs (compiled) or autotunes FLA's kernels
    if compiled:
        # generate() sizes a static cache for the largest length it has seen on the model: size this one
        model.__dict__.pop("_previous_max_cache_length", None)
    before = dynamo_counters()
    t0 = time.perf_counter()
    timer = make_step_timer(cuda, deadline, watch_compiles=compiled)
    out = generate(timer, **({"cache_implementation": "static"} if compiled else {}))
    timer.intervals_ms()  # syncs
    row["warmup_wall_s"] = time.perf_counter() - t0
    # tokens whose forward made new dynamo graphs (token 0 comes from the eager prefill)
    previous = [timer.graphs_at_start] + timer.graphs
    row["warmup_compile_tokens"] = [i for i, g in enumerate(timer.graphs) if g > previous[i]]
    row["warmup_counters"] = counter_delta(before, dynamo_counters())
    if timer.stop_reason:
        raise RuntimeError(f"warm-up {timer.stop_reason}")
    cache = output_cache(out) if compiled else None
    del out
    if compiled:
        if cache is None:
            raise RuntimeError("generate(return_dict_in_generate=True) returned no cache to re-use")
        row["cache_class"] = type(cache).__name__
        cache.reset()

    # timed run
    before = dynamo_counters()
    t0 = time.perf_counter()
    timer = make_step_timer(cuda, deadline, watch_compiles=compiled)
    out = generate(timer, **({name: cache} if compiled else {}))
    prefill_ms, steps = timer.intervals_ms()
    row["timed_wall_s"] = time.perf_counter() - t0
    timed_counters = counter_delta(before, dynamo_counters())
    if timer.stop_reason:
        raise RuntimeError(f"timed run {timer.stop_reason}")
    timed = steps[args.warmup : args.warmup + args.steps]
    if len(timed) < args.steps:
        raise RuntimeError(f"timed run made {len(steps) + 1} tokens, expected {new}")
    cache = output_cache(out)
    sequences = out.sequences
    del out
    step_ms = statistics.median(timed)
    row.update(
        prefill_ms=prefill_ms,
        decode_ms_per_step=step_ms,
        decode_ms_p10=sorted(timed)[len(timed) // 10],
        decode_ms_p90=sorted(timed)[(9 * len(timed)) // 10],
        decode_ms_warmup_steps=steps[: args.warmup],
        tokens_per_s=1e3 * batch / step_ms,
        cache_class=type(cache).__name__ if cache is not None else None,
        cache_bytes=tensor_bytes(cache) if cache is not None else None,
        recompiles_after_warmup=timer.graphs[-1] - timer.graphs_at_start if compiled else 0,
        timed_counters=timed_counters,
        compile_s_estimate=row["warmup_wall_s"] - row["timed_wall_s"] if compiled else None,
    )
    del cache
    return sequences[:, context:].cpu(), sequences[0]


def run_case(variant: str, point: str, batch: int, context: int, args, run: dict) -> dict:
    model_key, compiled = VARIANTS[variant]
    row = {"variant": variant, "point": point, "batch": batch, "context": context, "status": "ok"}
    started = time.perf_counter()
    model = get_model(model_key, args, run)
    if model is None:
        return {**row, **run["model_errors"][model_key]}
    new = args.warmup + args.steps + 1
    est = estimate_bytes(model_key, compiled, batch, context, new, run["shape"], run["linear_count"])
    resident = resident_bytes(args.device, run["models"])
    row["memory_estimate_bytes"] = {**est, "resident": resident}
    if run["memory_limit"] is not None and resident + est["total"] > run["memory_limit"]:
        return {
            **row,
            "status": "skipped",
            "reason": f"would not fit: resident {resident / 1e9:.1f} GB + cache {est['cache'] / 1e9:.1f} GB + "
            f"prefill activations {est['transient'] / 1e9:.1f} GB > limit {run['memory_limit'] / 1e9:.1f} GB",
        }
    guess = run["durations"].get(variant, (SMOKE_FIRST_GUESS_S if args.smoke else FIRST_GUESS_S)[compiled])
    if time.perf_counter() + guess > run["budget_end"]:
        left = run["budget_end"] - time.perf_counter()
        return {
            **row,
            "status": "skipped",
            "reason": f"time budget: {left:.0f} s left, this case takes ~{guess:.0f} s",
        }

    run["announce"](variant, point)
    gc.collect()
    if args.device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    run["log"].take()
    try:
        with torch.no_grad():
            tokens, row0 = measure(model, variant, batch, context, args, run, row)
        row["peak_memory_bytes"] = torch.cuda.max_memory_allocated() if args.device == "cuda" else None
        try:
            with torch.no_grad(), sdpa_context(model_key != "fla" and not args.no_flash):
                row["teacher_forced"] = teacher_forced(model, row0, context, args.tf_tol)
        except Exception as err:  # noqa: BLE001 (the timing stands; the check is marked failed)
            row["teacher_forced"] = {"consistent": False, "error": f"{type(err).__name__}: {err}"[:2000]}
        if compiled:
            eager = run["tokens"].get((model_key, point))
            row["greedy_vs_eager"] = (
                compare_tokens(tokens, eager)
                if eager is not None
                else "not checked: the eager variant did not run here"
            )
        else:
            run["tokens"][(model_key, point)] = tokens
    except Exception as err:  # noqa: BLE001 (recorded; the other variants go on)
        row.update(
            status="error",
            error=f"{type(err).__name__}: {err}"[:3000],
            traceback=traceback.format_exc()[-6000:],
        )
    finally:
        row["compile_log"] = run["log"].take()
        row["wall_s"] = time.perf_counter() - started
        run["durations"][variant] = row["wall_s"]
        if compiled and run["reset_dynamo"]:
            torch._dynamo.reset()  # drops the graphs, their CUDA-graph pools and what they hold on to
        gc.collect()
        if args.device == "cuda":
            torch.cuda.empty_cache()
    return row


def get_model(key: str, args, run: dict):
    """The model of a variant, or None with ``run["model_errors"][key]`` saying why (FLA is built on first
    use, once: a failed import is not retried at every point)."""
    models = run["models"]
    if key == "fla" and key not in models:
        models["fla"] = None
        try:
            models["fla"] = build_fla(run["shape"], args.device)
            fix_generation_config(models["fla"])
            run["fla_config"] = {
                k: getattr(models["fla"].config, k)
                for k in (
                    "hidden_size",
                    "num_heads",
                    "expand_k",
                    "expand_v",
                    "intermediate_size",
                    "num_hidden_layers",
                    "tie_word_embeddings",
                )
            }
        except ImportError as err:
            run["model_errors"]["fla"] = {"status": "skipped", "reason": f"fla does not import: {err}"[:2000]}
        except Exception as err:  # noqa: BLE001 (recorded; the other variants go on)
            run["model_errors"]["fla"] = {
                "status": "error",
                "error": f"building GLAForCausalLM failed: {type(err).__name__}: {err}"[:2000],
                "traceback": traceback.format_exc()[-6000:],
            }
    return models.get(key)


# ---------------------------------------------------------------- verdicts, table, plot


def find(rows, variant, point):
    for r in rows:
        if r["variant"] == variant and r["point"] == point and r["status"] == "ok":
            return r
    return None


def checks_ok(row) -> bool:
    tf = row.get("teacher_forced") or {}
    return bool(tf.get("consistent")) and row.get("recompiles_after_warmup", 0) == 0


def verdicts(rows, points: list[str]) -> dict:
    out = {}

    def pair(key, target, variant_a, variant_b, point, metric, test):
        a, b = find(rows, variant_a, point), find(rows, variant_b, point)
        if a is None or b is None:
            missing = [v for v, r in ((variant_a, a), (variant_b, b)) if r is None]
            out[key] = {"target": target, "pass": None, "note": f"not measured at {point}: {missing}"}
            return
        ratio = a[metric] / b[metric]
        speed, checks = test(ratio, a), checks_ok(a) and checks_ok(b)
        out[key] = {
            "target": target,
            "pass": speed and checks,
            "speed_ok": speed,
            "checks_ok": checks,
            "ratio": ratio,
            variant_a: a[metric],
            variant_b: b[metric],
        }

    per_point = {}
    for p in points:
        a, b = find(rows, "hybrid_eager", p), find(rows, "qwen3_eager", p)
        if a and b:
            per_point[p] = {
                "ratio": a["decode_ms_per_step"] / b["decode_ms_per_step"],
                "checks_ok": checks_ok(a) and checks_ok(b),
            }
    missing = [p for p in points if p in POINTS and p not in per_point]
    speed = all(v["ratio"] <= 0.8 for v in per_point.values()) if per_point else None
    checks = all(v["checks_ok"] for v in per_point.values()) if per_point else None
    out["hybrid_eager_vs_qwen3_eager"] = {
        "target": "hybrid eager ms/step <= 0.8x qwen3 eager at every point",
        "pass": (speed and checks) if per_point and not missing else (False if speed is False else None),
        "speed_ok": speed,
        "checks_ok": checks,
        "per_point": per_point,
        "not_measured": missing,
    }
    pair(
        "hybrid_compiled_vs_qwen3_compiled_1x1k",
        "hybrid compiled ms/step <= qwen3 compiled at B=1, 1k",
        "hybrid_compiled",
        "qwen3_compiled",
        "1x1k",
        "decode_ms_per_step",
        lambda r, a: r <= 1.0,
    )
    pair(
        "hybrid_compiled_vs_qwen3_compiled_1x32k",
        "hybrid compiled ms/step <= 0.7x qwen3 compiled at B=1, 32k",
        "hybrid_compiled",
        "qwen3_compiled",
        "1x32k",
        "decode_ms_per_step",
        lambda r, a: r <= 0.7,
    )
    pair(
        "hybrid_compiled_vs_qwen3_compiled_64x8k",
        "hybrid compiled tokens/s >= 2.5x qwen3 compiled at B=64, 8k",
        "hybrid_compiled",
        "qwen3_compiled",
        "64x8k",
        "tokens_per_s",
        lambda r, a: r >= 2.5,
    )
    r = find(rows, "hybrid_compiled", "1x32k")
    out["hybrid_compiled_1x32k_ms"] = (
        {"target": "hybrid compiled <= 3 ms/token at B=1, 32k", "pass": None, "note": "not measured"}
        if r is None
        else {
            "target": "hybrid compiled <= 3 ms/token at B=1, 32k",
            "pass": r["decode_ms_per_step"] <= 3.0 and checks_ok(r),
            "speed_ok": r["decode_ms_per_step"] <= 3.0,
            "checks_ok": checks_ok(r),
            "ms_per_token": r["decode_ms_per_step"],
        }
    )
    compiled = [r for r in rows if r["status"] == "ok" and VARIANTS[r["variant"]][1]]
    out["no_recompiles_after_warmup"] = {
        "target": "0 recompiles after warm-up in every compiled run",
        "pass": all(r["recompiles_after_warmup"] == 0 for r in compiled) if compiled else None,
        "per_case": {f"{r['variant']}@{r['point']}": r["recompiles_after_warmup"] for r in compiled},
    }
    greedy = [r for r in compiled if isinstance(r.get("greedy_vs_eager"), dict)]
    out["compiled_tokens_equal_eager"] = {
        "target": "greedy tokens of compiled equal eager (same model, same prompt)",
        "pass": all(r["greedy_vs_eager"]["tokens_equal"] for r in greedy) if greedy else None,
        "per_case": {f"{r['variant']}@{r['point']}": r["greedy_vs_eager"] for r in greedy},
        "note": "a difference after a near-tie is bf16 noise when teacher_forced.consistent holds",
    }
    return out


def print_table(record: dict) -> None:
    print()
    print(f"device: {record['device']}  versions: {record['versions']}")
    print(
        f"{'variant':<16} {'point':<9} {'B':>3} {'context':>7} {'prefill ms':>10} {'ms/step':>8} {'tok/s':>9} "
        f"{'cache GB':>8} {'peak GB':>7} {'recomp':>6} {'tf gap':>6} {'= eager':>7}"
    )
    for r in record["results"]:
        head = f"{r['variant']:<16} {r['point']:<9} {r['batch']:>3} {r['context']:>7}"
        if r["status"] != "ok":
            print(f"{head} {r['status']}: {(r.get('reason') or r.get('error') or '')[:110]}")
            continue
        greedy = r.get("greedy_vs_eager")
        same = (
            ("yes" if greedy["tokens_equal"] else f"{greedy['min_prefix_match']}/{greedy['steps_compared']}")
            if isinstance(greedy, dict)
            else "-"
        )
        peak = r["peak_memory_bytes"]
        print(
            f"{head} {r['prefill_ms']:>10.1f} {r['decode_ms_per_step']:>8.2f} {r['tokens_per_s']:>9.1f} "
            f"{(r['cache_bytes'] or 0) / 1e9:>8.3f} {(peak / 1e9 if peak else 0):>7.2f} "
            f"{r['recompiles_after_warmup']:>6} {r['teacher_forced'].get('max_gap', float('nan')):>6.3f} {same:>7}"
        )
    print()
    for v in record["verdicts"].values():
        state = {True: "PASS", False: "FAIL", None: "n/a "}[v["pass"]]
        extra = {
            k: (round(x, 3) if isinstance(x, float) else x)
            for k, x in v.items()
            if k not in ("target", "pass", "per_case", "per_point")
        }
        print(f"{state} {v['target']}  {extra}")


def plot(record: dict, path: str) -> str:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception as err:  # noqa: BLE001
        return f"skipped: matplotlib does not import ({type(err).__name__}: {err})"
    rows = [r for r in record["results"] if r["status"] == "ok"]
    if not rows:
        return "skipped: no case ran"
    # B=1 and the largest batch measured (B=64 at full size)
    panels = sorted({1, max(r["batch"] for r in rows)})
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.2), squeeze=False)
    for ax, batch in zip(axes[0], panels):
        for variant in VARIANTS:
            pts = sorted(
                (r["context"], r["tokens_per_s"])
                for r in rows
                if r["variant"] == variant and r["batch"] == batch
            )
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=variant)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("context (tokens)")
        ax.set_ylabel("tokens/s")
        ax.set_title(f"B={batch}")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"decode, {record['device']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_json(record: dict, path: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(record, f, indent=2, default=str)
    os.replace(tmp, path)


# ---------------------------------------------------------------- main


def parse_points(text: str, table: dict) -> dict:
    out = {}
    for item in (t.strip() for t in text.split(",") if t.strip()):
        if item in table:
            out[item] = table[item]
            continue
        m = re.fullmatch(r"(\d+)x(\d+)(k?)", item.lower())
        if not m:
            raise SystemExit(f"--points: {item!r} is neither one of {sorted(table)} nor BxCTX (e.g. 2x4k)")
        out[item] = (int(m.group(1)), int(m.group(2)) * (1024 if m.group(3) else 1))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--out",
        default=None,
        help="JSON path (default benchmarks/results/decode_gpu_<device>.json; --smoke: in the temp dir)",
    )
    parser.add_argument("--points", default=None, help=f"comma-separated, from {list(POINTS)} or BxCTX")
    parser.add_argument(
        "--variants", default=",".join(VARIANTS), help=f"comma-separated, from {list(VARIANTS)}"
    )
    parser.add_argument("--steps", type=int, default=32, help="timed decode steps per run")
    parser.add_argument("--warmup", type=int, default=8, help="decode steps before the timed ones, per run")
    parser.add_argument(
        "--budget-s", type=float, default=500.0, help="start no case that would end after this"
    )
    parser.add_argument("--case-limit-s", type=float, default=200.0, help="stop a generate running longer")
    parser.add_argument(
        "--compile-dynamic",
        choices=("default", "true", "false"),
        default="default",
        help="CompileConfig.dynamic: default (transformers' None, dynamo reset per case), true "
        "(one dynamic-shape compile for all points, no reset), false (static, reset per case)",
    )
    parser.add_argument("--fullgraph", action="store_true", help="CompileConfig(fullgraph=True)")
    parser.add_argument("--compile-backend", default=None, help="default inductor (aot_eager with --smoke)")
    parser.add_argument(
        "--tf-tol", type=float, default=0.25, help="teacher-forced logit gap still called consistent"
    )
    parser.add_argument("--max-memory-gb", type=float, default=None, help="memory limit for the fit check")
    parser.add_argument(
        "--no-flash", action="store_true", help="leave SDPA's backend choice alone in eager runs"
    )
    parser.add_argument("--device", default=None, help="cuda (default), or cpu with --smoke")
    parser.add_argument(
        "--smoke", action="store_true", help="CPU, tiny 2-layer model, short contexts, few steps"
    )
    args = parser.parse_args()

    if args.smoke:
        args.device = args.device or "cpu"
        args.steps = min(args.steps, 4)
        args.warmup = min(args.warmup, 2)
        if args.max_memory_gb is None:
            args.max_memory_gb = 2.0
    args.device = args.device or "cuda"
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench_decode_gpu: needs a CUDA GPU (or --smoke for a CPU run of the script)")
    table = SMOKE_POINTS if args.smoke else POINTS
    points = parse_points(args.points or (SMOKE_DEFAULT_POINTS if args.smoke else ",".join(POINTS)), table)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    if set(variants) - set(VARIANTS):
        raise SystemExit(
            f"--variants: unknown {sorted(set(variants) - set(VARIANTS))}; known: {list(VARIANTS)}"
        )
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else (platform.processor() or "cpu")
    # a smoke run's numbers mean nothing: they stay out of results/
    folder = os.path.join(tempfile.gettempdir(), "bench_decode_smoke") if args.smoke else "benchmarks/results"
    out = args.out or os.path.join(folder, f"decode_gpu_{device_name.replace(' ', '_')}.json")
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    shape = SMOKE_SHAPE if args.smoke else SHAPE
    hybrid_layers = SMOKE_HYBRID_LAYERS if args.smoke else HYBRID_LAYERS
    start = time.perf_counter()

    from transformers.generation.configuration_utils import CompileConfig

    cc = {}
    if args.compile_dynamic != "default":
        cc["dynamic"] = args.compile_dynamic == "true"
    if args.fullgraph:
        cc["fullgraph"] = True
    backend = args.compile_backend or ("aot_eager" if args.smoke else "inductor")
    if backend != "inductor":
        cc.update(backend=backend, mode=None)  # modes are inductor's
    compile_config = CompileConfig(**cc)
    if args.device != "cuda":
        compile_config._compile_all_devices = True  # generate() compiles only on accelerators otherwise
    log = start_compile_log() if any(VARIANTS[v][1] for v in variants) else CompileLog()

    import swaa

    record = {
        "benchmark": "decode_gpu",
        "status": "running",
        "device": device_name,
        "versions": versions(),
        "args": vars(args),
        "shape": {**shape, "dtype": "bfloat16"},
        "points": points,
        "variants": variants,
        "hybrid": None,
        "compile_config": compile_config.to_dict(),
        "reset_dynamo_per_compiled_case": args.compile_dynamic != "true",
        "timing": {
            "method": "CUDA events recorded by a stopping criterion after every token of generate(); "
            "median of the steps after warm-up (host clock on CPU)",
            "warmup_steps": args.warmup,
            "timed_steps": args.steps,
            "runs_per_case": "one warm-up generate of the same shape, then the timed generate",
        },
        "memory_limit_bytes": None,
        "results": [],
        "verdicts": {},
    }
    run = {
        "shape": shape,
        "vocab": shape["vocab_size"],
        "compile_config": compile_config,
        "reset_dynamo": args.compile_dynamic != "true",
        "models": {},
        "model_errors": {},
        "tokens": {},
        "durations": {},
        "log": log,
        "budget_end": start + args.budget_s,
        "linear_count": 0,
    }

    def announce(variant: str, point: str) -> None:
        # a step cut off inside a case (a long compile) still says which one
        progress(f"{variant} {point}: running")
        record["running"] = f"{variant}@{point}"
        write_json(record, out)

    run["announce"] = announce
    write_json(record, out)

    keys = {VARIANTS[v][0] for v in variants}
    if keys & {"qwen3", "hybrid"}:
        qwen3 = build_model(shape, args.device)
        fix_generation_config(qwen3)
        if "qwen3" in keys:
            run["models"]["qwen3"] = qwen3
        if "hybrid" in keys:
            # the same weights: the 7 softmax layers, MLPs and embeddings are Qwen3's own
            source = copy.deepcopy(qwen3) if "qwen3" in keys else qwen3
            try:
                hybrid = swaa.convert_to_hybrid(source, hybrid_layers, kind="gla")
                record["hybrid"] = getattr(hybrid.config, "swaa_hybrid", None)
                run["linear_count"] = len((record["hybrid"] or {}).get("linear_layers", []))
                run["models"]["hybrid"] = hybrid
            except Exception as err:  # noqa: BLE001 (recorded; the other variants go on)
                run["models"]["hybrid"] = None
                run["model_errors"]["hybrid"] = {
                    "status": "error",
                    "error": f"convert_to_hybrid failed: {type(err).__name__}: {err}"[:2000],
                    "traceback": traceback.format_exc()[-6000:],
                }
            del source
        del qwen3
        progress(f"models built ({', '.join(sorted(run['models']))}) on {device_name}")
    run["memory_limit"] = memory_limit(args.device, args.max_memory_gb)
    record["memory_limit_bytes"] = run["memory_limit"]
    record["model_errors"] = run["model_errors"]

    for point, (batch, context) in points.items():
        for variant in variants:
            row = run_case(variant, point, batch, context, args, run)
            record["results"].append(row)
            if row["status"] == "ok":
                progress(
                    f"{variant:<16} {point:<8} B={batch:<3} T={context:<6} prefill {row['prefill_ms']:9.1f} ms  "
                    f"decode {row['decode_ms_per_step']:8.2f} ms/step {row['tokens_per_s']:9.1f} tok/s  "
                    f"recompiles {row['recompiles_after_warmup']}  tf gap {row['teacher_forced'].get('max_gap', float('nan')):.3f}  "
                    f"({row['wall_s']:.0f} s)"
                )
            else:
                progress(
                    f"{variant:<16} {point:<8} B={batch:<3} T={context:<6} {row['status']}: "
                    f"{(row.get('reason') or row.get('error') or '')[:300]}"
                )
            record["verdicts"] = verdicts(record["results"], list(points))
            record["fla_config"] = run.get("fla_config")
            record["wall_s"] = time.perf_counter() - start
            write_json(record, out)

    record["status"] = "done"
    record.pop("running", None)
    record["plot"] = plot(record, os.path.splitext(out)[0] + ".png")
    record["wall_s"] = time.perf_counter() - start
    write_json(record, out)
    print_table(record)
    print(f"plot: {record['plot']}")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
