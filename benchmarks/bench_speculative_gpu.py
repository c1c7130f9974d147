"""Speculative decoding on the GPU (issue 13): prompt lookup on a Qwen3-1.7B-shaped model and its every:4
GLA hybrid, against plain greedy, and the cost of one verification step.

Random weights (speed does not depend on them), bf16, B=1, DynamicCache, eager ``generate()``, SDPA left to
pick its backend: on the H200 (torch 2.11, priority flash, memory-efficient, math, cuDNN) flash runs the
prompt and the single-token steps, and a verification forward of k > 1 tokens on a cache, which carries a
mask that flash refuses and whose GQA / unaligned mask memory-efficient refuses, runs on math (forcing
flash, as bench_decode_gpu.py does for decode, would fail it). Both models are in one process, the hybrid being ``swaa.convert_to_hybrid(copy of the
Qwen3, "every:4", kind="gla")``: 21 of 28 layers GLA, the rest Qwen3's own weights.

The prompt repeats itself: a block of ``--block`` distinct random tokens, ``--block-repeats`` times (1024
tokens by default), so prompt lookup finds a continuation for the last two tokens. Modes, per model:

    greedy          plain greedy, ``--new-tokens`` M (128) new tokens
    lookup K        ``prompt_lookup_num_tokens=K`` (K in ``--lookup``, 3,5,10). With random weights the
                    model's continuation is whatever it is: the drafts are accepted only where the model
                    happens to repeat itself, so these rows measure that model, not prompt lookup
    self-draft K    the same prompt lookup, with a logits processor that makes every pick the block's next
                    token: the model agrees with its drafts by construction, every draft is accepted, and
                    the row measures what K+1 tokens per verification forward buy (its forwards still run
                    in full; only their scores are replaced). ``--no-self-draft`` leaves it out

Per mode: tokens/s (M over generate's whole time, prompt forward included; CUDA events around the call,
median of ``--repeats`` interleaved rounds after a short warm-up round of every mode), the median step (a
forward pre-hook marks each forward's start: the intervals after the prompt's forward, generate's host work
included; on a lent H200 B=1 eager steps vary 25-65 ms between runs and machines, so ``tok/s@step``, tokens
per forward at the median step, is the steadier comparison), main-model forwards, tokens per
forward (accepted drafts + 1), drafted tokens and the share accepted (a last draft running past the M-th
token counts as drafted), and two checks:

- the tokens against greedy's: ``identical``, or the first differing token and the logit gap there in
  greedy's own scores. bf16 kernels of different shapes (a k-token verification vs a 1-token step) round
  near-ties either way, and random weights leave many (greedy's own teacher-forced argmax agrees with its
  tokens at 85-97%, bench_decode_gpu.py), so a difference at a gap under ``--tie-tol`` is numerics, over it
  a real disagreement. A self-draft row must equal the block's continuation exactly (forced: it says the
  machinery ran, not that the model agreed);
- the cache generate returns (every crop and rollback done): the last token's scores through it against
  a fresh prefill of the whole sequence, relative difference, in the first timed round. Greedy's own cache
  gives the bf16 floor; a speculative one must stay within 3x of it (floor 0.01). This one catches a
  wrong rollback that the token check may not (a wrong state can first show at a near-tie): a CPU smoke run
  with the rollback disabled on purpose failed it at 0.08-0.15 against 0.0 and passed the token check.

The script exits 1 when a check fails (JSON and table written first).

Verification cost (``--ks`` 1,3,5,10), per model, on a cache holding the prompt: one forward of k tokens
with the cache recording the past (what speculative generate turns on), then ``crop`` keeping 1 of them
(all drafts rejected: the hybrid rolls its GLA states back by recomputing them over the kept token) or all
(crop of 0), against k single-token steps: k times the median of ``--steps`` steps of plain greedy (a cache
that does not record). CUDA events, synchronised before each step or repetition (generate syncs at every
step too), medians of ``--verify-reps`` after ``--verify-warmup``; each loop starts from a fresh prefill
and its cache grows by the tokens kept.

A case that would end past ``--budget-s`` is skipped with the reason (the verification cases run first,
then the warm-up round, then the timed rounds); JSON is rewritten after every case.

Usage:
    python benchmarks/bench_speculative_gpu.py --out benchmarks/results/speculative_gpu_<device>.json
    OMP_NUM_THREADS=1 python benchmarks/bench_speculative_gpu.py --smoke    # CPU, tiny model, ~15 s
"""

from __future__ import annotations

import argparse
import copy
import inspect
import os
import platform
import statistics
import sys
import tempfile
import time
import traceback

import torch
from bench_decode_gpu import (
    SMOKE_HYBRID_LAYERS,
    SMOKE_SHAPE,
    cache_argument,
    fix_generation_config,
    output_cache,
    write_json,
)
from bench_hybrid_gpu import HYBRID_LAYERS, SHAPE, build_model, versions
from common import progress

# seconds per main-model forward assumed before one has been measured (the budget check)
FIRST_STEP_S = {"cuda": 0.05, "cpu": 0.02}
# the cache check: a speculative run's difference to a fresh prefill against greedy's, relative
CACHE_TOL_FACTOR = 3.0
CACHE_TOL_FLOOR = 0.01


# ---------------------------------------------------------------- inputs


def prompt_and_target(block: int, repeats: int, extra: int, vocab: int, device: str):
    """(prompt [1, block * repeats], target [1, block * repeats + extra]): a block of distinct random ids
    (from 1 on: 0 is the pad id) repeated; the target goes on repeating it (what self-draft forces)."""
    g = torch.Generator(device="cpu").manual_seed(0)
    ids = torch.randperm(vocab - 1, generator=g)[:block] + 1
    n = block * repeats
    seq = ids.repeat(-(-(n + extra) // block))[: n + extra]
    return seq[None, :n].to(device), seq[None].to(device)


def follow_target(target: torch.Tensor):
    """A logits processor that makes every pick the target's next token (the model's scores replaced)."""
    from transformers import LogitsProcessor

    class FollowTarget(LogitsProcessor):
        def __call__(self, input_ids, scores):
            n = input_ids.shape[1]
            if n >= target.shape[1]:
                return scores
            forced = torch.full_like(scores, float("-inf"))
            return forced.scatter_(1, target[:, n : n + 1].expand(scores.shape[0], 1), 0.0)

    return FollowTarget()


# ---------------------------------------------------------------- timing helpers


class Clock:
    """CUDA events on a GPU, the host clock on CPU; `ms(a, b)` syncs."""

    def __init__(self, cuda: bool):
        self.cuda = cuda

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def mark(self):
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def ms(self, a, b) -> float:
        if not self.cuda:
            return 1e3 * (b - a)
        torch.cuda.synchronize()
        return a.elapsed_time(b)


class ForwardCounter:
    """Counts a model's forwards and the tokens fed to each (a verification step is one forward), and marks
    the clock as each starts: the intervals between marks are generate's steps, its host work included."""

    def __init__(self, model, clock: Clock):
        self.fed: list[int] = []
        self.marks: list = []
        self.clock = clock
        self.handle = model.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        self.fed.append(int(ids.shape[1]) if isinstance(ids, torch.Tensor) else 0)
        self.marks.append(self.clock.mark())


def median(xs):
    return statistics.median(xs) if xs else None


# ---------------------------------------------------------------- caches


def new_cache(model):
    from transformers import DynamicCache

    try:
        return DynamicCache(config=model.config)
    except TypeError:  # transformers 4.x takes no config
        return DynamicCache()


# transformers 5.x: crop(-tokens to remove); 4.x: crop(length to keep)
_CROP_REMOVES = None


def crop_tokens(cache, n: int) -> None:
    """Remove the last `n` tokens (n = 0: the crop generate makes after a fully accepted draft)."""
    global _CROP_REMOVES
    if _CROP_REMOVES is None:
        _CROP_REMOVES = "tokens_to_remove" in inspect.signature(type(cache).crop).parameters
    cache.crop(-n if _CROP_REMOVES else int(cache.get_seq_length()) - n)


# ---------------------------------------------------------------- cases


def prefilled(model, prompt, record: bool):
    """A cache holding the prompt (recording the past when `record`: what speculative generate turns on)."""
    cache = new_cache(model)
    if record:
        cache.activate_past_recording()
    model(prompt, use_cache=True, logits_to_keep=1, **{cache_argument(model): cache})
    return cache


@torch.no_grad()
def single_step_case(model, prompt, tokens, args, clock: Clock) -> dict:
    """Plain greedy's step: one token into a cache that does not record, synchronised before each (as
    generate is, every step); median of ``--steps`` after ``--verify-warmup``."""
    arg = cache_argument(model)
    cache, ms = prefilled(model, prompt, False), []
    for r in range(args.verify_warmup + args.steps):
        clock.sync()
        a = clock.mark()
        model(tokens[:, r : r + 1], use_cache=True, **{arg: cache})
        b = clock.mark()
        if r >= args.verify_warmup:
            ms.append(clock.ms(a, b))
    q = sorted(ms)
    return {
        "step_ms": median(ms),
        "step_ms_p10": q[len(q) // 10],
        "step_ms_p90": q[(9 * len(q)) // 10],
        "all": ms,
    }


@torch.no_grad()
def verification_case(model, prompt, tokens, k: int, args, clock: Clock, step_ms: float) -> dict:
    """One verification forward of k tokens + crop, against k single-token steps (see the docstring)."""
    arg = cache_argument(model)
    reps = args.verify_warmup + args.verify_reps
    # k steps of plain greedy: k times the median step (timed back to back they carry the same bursts)
    row = {"k": k, "cache_tokens": prompt.shape[1], "k_steps_ms": k * step_ms}
    # speculative: one forward of k tokens while recording, then the crop generate would make
    for name, keep in (("reject", 1), ("accept", k)):
        cache, fwd, crop = prefilled(model, prompt, True), [], []
        for r in range(reps):
            clock.sync()
            a = clock.mark()
            model(tokens[:, :k], use_cache=True, **{arg: cache})
            b = clock.mark()
            crop_tokens(cache, k - keep)
            c = clock.mark()
            if r >= args.verify_warmup:
                fwd.append(clock.ms(a, b))
                crop.append(clock.ms(b, c))
        row[f"forward_ms_{name}_loop"] = median(fwd)
        row[f"forward_ms_{name}_loop_all"] = fwd
        row[f"crop_{name}_ms"] = median(crop)
        row[f"crop_{name}_ms_all"] = crop
        row[f"cache_tokens_after_{name}_loop"] = int(cache.get_seq_length())
        del cache
    row["forward_ms"] = median(row["forward_ms_reject_loop_all"] + row["forward_ms_accept_loop_all"])
    # a verification whose drafts are all rejected, and one whose drafts are all accepted
    row["verify_reject_ms"] = row["forward_ms"] + row["crop_reject_ms"]
    row["verify_accept_ms"] = row["forward_ms"] + row["crop_accept_ms"]
    row["ratio_reject"] = row["verify_reject_ms"] / row["k_steps_ms"]
    row["ratio_accept"] = row["verify_accept_ms"] / row["k_steps_ms"]
    return row


@torch.no_grad()
def generate_once(model, prompt, target, mode: dict, new_tokens: int, clock: Clock, extras: bool) -> dict:
    """One generate: new tokens [n] on the host, ms, tokens fed per forward; with `extras`, greedy's scores
    [n, V] and the check of the cache it returns (``cache_check``)."""
    from transformers import LogitsProcessorList

    kwargs = dict(
        attention_mask=torch.ones_like(prompt),
        max_new_tokens=new_tokens,
        do_sample=False,
        disable_compile=True,
        return_dict_in_generate=True,
        output_logits=extras and mode["name"] == "greedy",
    )
    if mode["lookup"] is not None:
        kwargs["prompt_lookup_num_tokens"] = mode["lookup"]
    if mode["forced"]:
        kwargs["logits_processor"] = LogitsProcessorList([follow_target(target)])
    counter = ForwardCounter(model, clock)
    try:
        clock.sync()
        a = clock.mark()
        out = model.generate(prompt, **kwargs)
        b = clock.mark()
        ms = clock.ms(a, b)
    finally:
        counter.handle.remove()
    marks = counter.marks + [b]
    # forward i's start to forward i+1's (the last: to generate's end); the first holds the prompt
    periods = [clock.ms(x, y) for x, y in zip(marks, marks[1:])]
    run = {
        "ms": ms,
        "fed": counter.fed,
        "periods": periods,
        "tokens": out.sequences[0, prompt.shape[1] :].cpu(),
    }
    run["n_tokens"] = len(run["tokens"])
    if extras:
        if kwargs["output_logits"]:
            run["logits"] = torch.cat(out.logits)  # [n, V] (B = 1)
        run["cache_check"] = cache_check(model, out.sequences, output_cache(out))
    return run


@torch.no_grad()
def cache_check(model, sequence: torch.Tensor, cache) -> dict:
    """The cache generate returned, every crop of it included, against a fresh prefill of the same tokens:
    the last token's scores through that cache vs through one forward over the whole sequence."""
    if cache is None:
        return {"error": "generate returned no cache"}
    arg = cache_argument(model)
    held = int(cache.get_seq_length())
    if not 0 < held < sequence.shape[1]:
        return {"error": f"the cache holds {held} tokens of a {sequence.shape[1]}-token sequence"}
    got = model(sequence[:, held:], use_cache=True, **{arg: cache}).logits[0, -1].float()
    want = model(sequence, use_cache=True, logits_to_keep=1, **{arg: new_cache(model)}).logits[0, -1].float()
    return {
        "cache_tokens": held,
        "max_abs_diff": float((got - want).abs().max()),
        "rel_diff": float((got - want).norm() / want.norm()),
        "same_argmax": bool(got.argmax() == want.argmax()),
    }


def compare(tokens: torch.Tensor, ref: torch.Tensor, ref_logits, tol: float) -> dict:
    """`tokens` against the reference `ref` (both [n]): equal, or where they first differ and, with the
    reference's scores, how far below the reference's pick the other token scored there."""
    n = min(len(tokens), len(ref))
    diff = (tokens[:n] != ref[:n]).nonzero()
    if not len(diff) and len(tokens) == len(ref):
        return {"identical": True, "consistent": True}
    out = {"identical": False, "lengths": [len(tokens), len(ref)]}
    if not len(diff):
        out.update(first_diff=n, consistent=False, note="lengths differ")
        return out
    i = int(diff[0, 0])
    out["first_diff"] = i
    if ref_logits is None:
        out["consistent"] = False
        return out
    row = ref_logits[i].float()
    gap = float(row[ref[i]] - row[tokens[i]])
    top2 = torch.topk(row, 2).values
    out.update(gap=gap, top2_gap=float(top2[0] - top2[1]), tol=tol, consistent=gap <= tol)
    return out


def summarise(runs: list[dict], prompt_len: int) -> dict:
    ms = [r["ms"] for r in runs]
    fed = runs[-1]["fed"]
    forwards = len(fed)
    n = runs[-1]["n_tokens"]
    # steps after the prompt's forward, pooled over the runs: the median step is robust to a host's bursts
    steps = [p for r in runs for p in r["periods"][1:]]
    step_ms = median(steps)
    drafted = sum(fed) - prompt_len - (forwards - 1)  # every forward but the prompt's feeds 1 + its draft
    accepted = max(n - forwards, 0)  # each forward gives one token of its own beyond the accepted drafts
    return {
        "ms": median(ms),
        "ms_all": ms,
        "tokens_per_s": 1e3 * n / median(ms),
        "new_tokens": n,
        "forwards": forwards,
        "tokens_per_forward": n / max(forwards, 1),
        "step_ms_median": step_ms,
        "first_forward_ms": median([r["periods"][0] for r in runs if r["periods"]]),
        # tokens per forward at the median step's pace
        "tokens_per_s_at_median_step": 1e3 * n / max(forwards, 1) / step_ms if step_ms else None,
        "drafted_tokens": drafted,
        "accepted_drafts": accepted,
        "acceptance": accepted / drafted if drafted else None,
        "forwards_all_runs": [len(r["fed"]) for r in runs],
        "fed_first_forward": fed[0] if fed else None,
        # tokens fed per later forward (1 + the draft) -> how many forwards
        "fed_later_forwards": {str(k): fed[1:].count(k) for k in sorted(set(fed[1:]))},
    }


# ---------------------------------------------------------------- main


def parse_ints(text: str) -> list[int]:
    return [int(t) for t in text.split(",") if t.strip()]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None, help="JSON path (default results/speculative_gpu_<device>.json)")
    ap.add_argument("--models", default="hybrid,qwen3", help="comma-separated, from hybrid,qwen3")
    ap.add_argument("--new-tokens", type=int, default=128, help="M: new tokens per generate")
    ap.add_argument("--lookup", default="3,5,10", help="prompt-lookup K values")
    ap.add_argument(
        "--self-draft",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="the self-draft modes (drafts accepted by construction)",
    )
    ap.add_argument("--block", type=int, default=128, help="tokens of the random block the prompt repeats")
    ap.add_argument("--block-repeats", type=int, default=8, help="times the prompt repeats the block")
    ap.add_argument("--repeats", type=int, default=1, help="timed rounds of every mode (median)")
    ap.add_argument("--warmup-tokens", type=int, default=16, help="new tokens of the warm-up round")
    ap.add_argument("--ks", default="1,3,5,10", help="verification sizes k")
    ap.add_argument("--steps", type=int, default=24, help="timed single-token steps per model")
    ap.add_argument("--verify-warmup", type=int, default=2, help="untimed repetitions before the timed ones")
    ap.add_argument("--verify-reps", type=int, default=7, help="timed verification forwards per k and crop")
    ap.add_argument("--tie-tol", type=float, default=0.125, help="logit gap bf16 rounding may flip")
    ap.add_argument("--budget-s", type=float, default=110.0, help="start no case that would end after this")
    ap.add_argument("--device", default=None, help="cuda (default), or cpu with --smoke")
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny 2-layer model, short prompt")
    args = ap.parse_args()
    run(args)


def run(args) -> None:
    if args.smoke:
        args.device = args.device or "cpu"
        args.new_tokens = min(args.new_tokens, 24)
        args.block = min(args.block, 16)
        args.block_repeats = min(args.block_repeats, 4)
        args.warmup_tokens = min(args.warmup_tokens, 4)
        args.verify_reps = min(args.verify_reps, 2)
        args.steps = min(args.steps, 4)
        args.verify_warmup = min(args.verify_warmup, 1)
    args.device = args.device or "cuda"
    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        raise SystemExit("bench_speculative_gpu: needs a CUDA GPU (or --smoke for a CPU run of the script)")
    models_wanted = [m.strip() for m in args.models.split(",") if m.strip()]
    if set(models_wanted) - {"hybrid", "qwen3"}:
        raise SystemExit(f"--models: unknown {sorted(set(models_wanted) - {'hybrid', 'qwen3'})}")
    lookups, ks = parse_ints(args.lookup), parse_ints(args.ks)
    device_name = torch.cuda.get_device_name() if cuda else (platform.processor() or "cpu")
    folder = os.path.join(tempfile.gettempdir(), "bench_spec_smoke") if args.smoke else "benchmarks/results"
    out_path = args.out or os.path.join(folder, f"speculative_gpu_{device_name.replace(' ', '_')}.json")
    os.makedirs(os.path.dirname(out_path) or ".", exist_ok=True)
    shape = SMOKE_SHAPE if args.smoke else SHAPE
    start = time.perf_counter()
    budget_end = start + args.budget_s
    clock = Clock(cuda)

    import swaa

    modes = [{"name": "greedy", "lookup": None, "forced": False}]
    modes += [{"name": f"lookup K={k}", "lookup": k, "forced": False} for k in lookups]
    if args.self_draft:
        modes += [{"name": f"self-draft K={k}", "lookup": k, "forced": True} for k in lookups]
    prompt_len = args.block * args.block_repeats
    prompt, target = prompt_and_target(
        args.block,
        args.block_repeats,
        args.new_tokens + max(lookups + ks) + 2,
        shape["vocab_size"],
        args.device,
    )
    record = {
        "benchmark": "speculative_gpu",
        "status": "running",
        "device": device_name,
        "versions": versions(),
        "args": vars(args),
        # SDPBackend values in the order SDPA tries them (0 math, 1 flash, 2 memory-efficient, 3 cuDNN)
        "sdpa_priority": list(torch._C._get_sdp_priority_order())
        if cuda and hasattr(torch._C, "_get_sdp_priority_order")
        else None,
        "shape": {**shape, "dtype": "bfloat16"},
        "hybrid": None,
        "prompt_tokens": prompt_len,
        "modes": [m["name"] for m in modes],
        "timing": {
            "generate": "CUDA events around generate() (host clock on CPU), median of the timed rounds",
            "verification": "CUDA events around the forward and around the crop, synchronised before each "
            "repetition; median after warm-up",
        },
        "single_step": [],
        "verification": [],
        "generate": [],
        "skipped": [],
        "checks": {},
    }
    write_json(record, out_path)

    # the models: Qwen3 and its hybrid (same weights outside the converted attention)
    qwen3 = build_model(shape, args.device)
    fix_generation_config(qwen3)
    models = {}
    if "hybrid" in models_wanted:
        source = copy.deepcopy(qwen3) if "qwen3" in models_wanted else qwen3
        models["hybrid"] = swaa.convert_to_hybrid(
            source, SMOKE_HYBRID_LAYERS if args.smoke else HYBRID_LAYERS, kind="gla"
        )
        record["hybrid"] = getattr(models["hybrid"].config, "swaa_hybrid", None)
        del source
    if "qwen3" in models_wanted:
        models["qwen3"] = qwen3
    del qwen3
    models = {name: models[name] for name in models_wanted}
    progress(f"models built ({', '.join(models)}) on {device_name}; prompt {prompt_len} tokens")

    step_s = {}  # measured seconds per forward, per model (the budget's guesses)

    def guess_s(name: str, forwards: float) -> float:
        return forwards * step_s.get(name, FIRST_STEP_S["cuda" if cuda else "cpu"])

    def fits(what: str, seconds: float) -> bool:
        left = budget_end - time.perf_counter()
        if seconds <= left:
            return True
        record["skipped"].append(f"{what}: time budget, {left:.1f} s left, it takes ~{seconds:.1f} s")
        progress(f"skipped {what}: time budget ({left:.1f} s left, ~{seconds:.1f} s needed)")
        write_json(record, out_path)
        return False

    def finish_case() -> None:
        record["wall_s"] = time.perf_counter() - start
        if cuda:
            record["peak_memory_bytes"] = torch.cuda.max_memory_allocated()
        write_json(record, out_path)

    def error_row(err, **row) -> dict:
        row.update(status="error", error=f"{type(err).__name__}: {err}"[:3000])
        row["traceback"] = traceback.format_exc()[-6000:]
        return row

    # (c) the verification step, first: cheap and what the rest is explained by
    tokens = target[:, prompt_len:]
    for name, model in models.items():
        if not fits(f"single step {name}", guess_s(name, args.verify_warmup + args.steps + 3)):
            continue
        t0 = time.perf_counter()
        try:
            single = single_step_case(model, prompt, tokens, args, clock)
            single.update(model=name, status="ok")
            step_s[name] = single["step_ms"] / 1e3
            progress(
                f"step   {name:<6} {single['step_ms']:7.2f} ms (p10 {single['step_ms_p10']:.2f}, "
                f"p90 {single['step_ms_p90']:.2f})"
            )
        except Exception as err:  # noqa: BLE001 (recorded; the other cases go on)
            single = error_row(err, model=name)
            progress(f"step   {name}: {single['error'][:300]}")
        single["wall_s"] = time.perf_counter() - t0
        record["single_step"].append(single)
        finish_case()
        if single["status"] != "ok":
            continue
        for k in ks:
            reps = args.verify_warmup + args.verify_reps
            if not fits(f"verification {name} k={k}", guess_s(name, 2 * reps * 1.5 + 2)):
                continue
            t0 = time.perf_counter()
            try:
                row = verification_case(model, prompt, tokens, k, args, clock, single["step_ms"])
                row.update(model=name, status="ok")
                progress(
                    f"verify {name:<6} k={k:<2} forward {row['forward_ms']:7.2f} ms  crop (reject) "
                    f"{row['crop_reject_ms']:6.2f} ms  crop (accept) {row['crop_accept_ms']:6.2f} ms  "
                    f"{k} steps {row['k_steps_ms']:7.2f} ms"
                )
            except Exception as err:  # noqa: BLE001 (recorded; the other cases go on)
                row = error_row(err, model=name, k=k)
                progress(f"verify {name} k={k}: {row['error'][:300]}")
            row["wall_s"] = time.perf_counter() - t0
            record["verification"].append(row)
            finish_case()

    # (a, b) generate: a warm-up round of every mode (short), then the timed rounds, modes interleaved
    runs = {(name, m["name"]): [] for name in models for m in modes}
    errors = {}
    reference = {}  # model -> (greedy's tokens, greedy's scores)

    def forwards_of(m: dict, new: int) -> float:
        if m["forced"]:
            return new / (m["lookup"] + 1) + 2  # every draft accepted
        return new * (1.15 if m["lookup"] is not None else 1.0)  # a verification costs a little more

    for rnd in range(args.repeats + 1):
        warm = rnd == 0
        new = args.warmup_tokens if warm else args.new_tokens
        label = "warm-up" if warm else f"round {rnd}"
        for name, model in models.items():
            for m in modes:
                key = (name, m["name"])
                if key in errors:
                    continue
                need = guess_s(name, forwards_of(m, new) + 1)
                if not fits(f"{label} {name} {m['name']}", need):
                    continue
                # round 1 also keeps greedy's scores and checks each returned cache against a fresh prefill
                extras = rnd == 1
                try:
                    one = generate_once(model, prompt, target, m, new, clock, extras)
                except Exception as err:  # noqa: BLE001 (recorded; the other modes go on)
                    errors[key] = {
                        "error": f"{type(err).__name__}: {err}"[:3000],
                        "traceback": traceback.format_exc()[-6000:],
                    }
                    progress(f"{label} {name} {m['name']}: {errors[key]['error'][:300]}")
                    finish_case()
                    continue
                forwards = len(one["fed"])
                if warm:
                    progress(f"{label} {name:<6} {m['name']:<15} {one['ms']:8.1f} ms ({forwards} forwards)")
                    continue
                if "logits" in one:
                    reference[name] = (one["tokens"], one.pop("logits"))
                if m["name"] == "greedy":
                    step_s[name] = one["ms"] / 1e3 / max(forwards, 1)
                runs[key].append(one)
                check = one.get("cache_check", {})
                progress(
                    f"{label} {name:<6} {m['name']:<15} {one['ms']:8.1f} ms  "
                    f"{1e3 * one['n_tokens'] / one['ms']:7.1f} tok/s  {forwards} forwards"
                    + (f"  cache vs prefill: rel {check['rel_diff']:.4f}" if "rel_diff" in check else "")
                )
                record["generate"] = rows_of(runs, errors, reference, models, modes, target, prompt_len, args)
                finish_case()
    record["generate"] = rows_of(runs, errors, reference, models, modes, target, prompt_len, args)
    record["checks"] = checks(record)
    record["status"] = "done"
    finish_case()
    print_table(record)
    print(f"wrote {out_path}")
    failed = [k for k, v in record["checks"].items() if v["pass"] is False]
    if failed:
        print(f"FAILED checks: {failed}")
        sys.exit(1)


def rows_of(runs, errors, reference, models, modes, target, prompt_len, args) -> list[dict]:
    rows = []
    for name in models:
        base = None  # greedy's (tokens/s, tokens/s at the median step)
        for m in modes:
            key = (name, m["name"])
            row = {"model": name, "mode": m["name"], "lookup": m["lookup"], "self_draft": m["forced"]}
            if key in errors:
                rows.append({**row, "status": "error", **errors[key]})
                continue
            if not runs[key]:
                rows.append({**row, "status": "skipped"})
                continue
            row.update(status="ok", **summarise(runs[key], prompt_len))
            if m["name"] == "greedy":
                base = (row["tokens_per_s"], row["tokens_per_s_at_median_step"])
            row["speedup_vs_greedy"] = row["tokens_per_s"] / base[0] if base else None
            row["speedup_vs_greedy_at_median_step"] = (
                row["tokens_per_s_at_median_step"] / base[1]
                if base and base[1] and row["step_ms_median"]
                else None
            )
            toks = runs[key][-1]["tokens"]
            row["cache_check"] = next((r["cache_check"] for r in runs[key] if "cache_check" in r), None)
            row["same_tokens_every_run"] = all(torch.equal(r["tokens"], toks) for r in runs[key])
            if m["forced"]:
                want = target[0, prompt_len : prompt_len + args.new_tokens].cpu()
                row["vs_target"] = compare(toks, want, None, args.tie_tol)
            elif name in reference:
                ref, ref_logits = reference[name]
                if m["name"] == "greedy":
                    top2 = torch.topk(ref_logits.float(), 2, dim=-1).values
                    gaps = top2[:, 0] - top2[:, 1]
                    row["vs_greedy"] = {"identical": True, "consistent": True, "note": "the reference"}
                    # how many of greedy's own picks a rounding difference could flip
                    row["near_ties"] = {
                        "steps_with_top2_gap_under_tol": int((gaps <= args.tie_tol).sum()),
                        "min_top2_gap": float(gaps.min()),
                        "median_top2_gap": float(gaps.median()),
                    }
                else:
                    row["vs_greedy"] = compare(toks, ref, ref_logits, args.tie_tol)
            row["tokens"] = toks.tolist()
            rows.append(row)
    return rows


def checks(record: dict) -> dict:
    ok = [r for r in record["generate"] if r["status"] == "ok"]
    lookup = [r for r in ok if r["lookup"] is not None and not r["self_draft"] and "vs_greedy" in r]
    forced = [r for r in ok if r["self_draft"]]
    out = {
        "lookup_equals_greedy": {
            "target": "prompt-lookup tokens equal greedy's, or first differ at a near-tie (gap <= tie-tol)",
            "pass": all(r["vs_greedy"]["consistent"] for r in lookup) if lookup else None,
            "identical": {f"{r['model']} {r['mode']}": r["vs_greedy"]["identical"] for r in lookup},
        },
        "self_draft_equals_target": {
            "target": "self-draft tokens equal the forced continuation exactly",
            "pass": all(r["vs_target"]["identical"] for r in forced) if forced else None,
        },
        "greedy_deterministic": {
            "target": "every timed run of a mode gives the same tokens",
            "pass": all(r["same_tokens_every_run"] for r in ok) if ok else None,
        },
    }
    # the cache a speculative generate returns (its crops and rollbacks done) against a fresh prefill, at
    # most CACHE_TOL_FACTOR times the difference greedy's own cache shows (bf16 kernels of other shapes)
    base = {r["model"]: (r.get("cache_check") or {}).get("rel_diff") for r in ok if r["mode"] == "greedy"}
    spec = [r for r in ok if r["lookup"] is not None and "rel_diff" in (r.get("cache_check") or {})]
    bad = [r for r in ok if "error" in (r.get("cache_check") or {})]

    def cache_ok(r):
        floor = base.get(r["model"])
        return r["cache_check"]["rel_diff"] <= CACHE_TOL_FACTOR * max(floor or 0.0, CACHE_TOL_FLOOR)

    out["cache_matches_fresh_prefill"] = {
        "target": f"a speculative run's returned cache gives the last token's scores within {CACHE_TOL_FACTOR}x "
        f"the relative difference of greedy's own (floor {CACHE_TOL_FLOOR}) of a fresh prefill's",
        "pass": (all(cache_ok(r) for r in spec) and not bad) if spec or bad else None,
        "greedy_rel_diff": base,
        "rel_diff": {f"{r['model']} {r['mode']}": round(r["cache_check"]["rel_diff"], 5) for r in spec},
        "errors": {f"{r['model']} {r['mode']}": r["cache_check"]["error"] for r in bad},
    }
    errors = [f"{r['model']} {r['mode']}" for r in record["generate"] if r["status"] == "error"]
    errors += [f"single step {r['model']}" for r in record["single_step"] if r["status"] == "error"]
    errors += [
        f"verification {r['model']} k={r['k']}" for r in record["verification"] if r["status"] == "error"
    ]
    out["no_errors"] = {"target": "every case that ran finished", "pass": not errors, "errors": errors}
    return out


def print_table(record: dict) -> None:
    print()
    print(f"device: {record['device']}  versions: {record['versions']}")
    print(
        f"prompt {record['prompt_tokens']} tokens (a {record['args']['block']}-token block x "
        f"{record['args']['block_repeats']}), {record['args']['new_tokens']} new tokens, bf16, B=1, eager, "
        f"DynamicCache; median of {record['args']['repeats']} round(s)"
    )
    print("cache: the returned cache's last-token scores vs a fresh prefill's, relative difference")
    print()
    print(
        "step ms: median of generate's steps after the prompt's forward; tok/s@step: tokens per forward at it"
    )
    print(
        f"{'model':<7} {'mode':<15} {'tokens/s':>8} {'speed-up':>8} {'step ms':>7} {'tok/s@step':>10} "
        f"{'speed-up':>8} {'forwards':>8} {'tok/fwd':>7} {'drafted':>7} {'accept':>6} {'cache':>6}  output"
    )
    for r in record["generate"]:
        head = f"{r['model']:<7} {r['mode']:<15}"
        if r["status"] != "ok":
            print(f"{head} {r['status']} {(r.get('error') or '(time budget)')[:100]}")
            continue
        check = r.get("vs_target") or r.get("vs_greedy") or {}
        if r["mode"] == "greedy":
            same = "reference"
        elif check.get("identical"):
            same = "= target" if r["self_draft"] else "= greedy"
        elif "first_diff" in check:
            gap = f", gap {check['gap']:.3f}" if "gap" in check else ""
            tie = " (near-tie)" if check.get("consistent") else " DIFFERS"
            same = f"from token {check['first_diff']}{gap}{tie}"
        else:
            same = "not checked"
        acc = f"{r['acceptance']:.2f}" if r["acceptance"] is not None else "-"
        sp = f"{r['speedup_vs_greedy']:.2f}x" if r["speedup_vs_greedy"] else "-"
        sp_step = (
            f"{r['speedup_vs_greedy_at_median_step']:.2f}x" if r["speedup_vs_greedy_at_median_step"] else "-"
        )
        step = f"{r['step_ms_median']:.1f}" if r["step_ms_median"] else "-"
        rate = f"{r['tokens_per_s_at_median_step']:.1f}" if r["tokens_per_s_at_median_step"] else "-"
        cc = r.get("cache_check") or {}
        cache = f"{cc['rel_diff']:.3f}" if "rel_diff" in cc else ("error" if "error" in cc else "-")
        print(
            f"{head} {r['tokens_per_s']:>8.1f} {sp:>8} {step:>7} {rate:>10} {sp_step:>8} {r['forwards']:>8} "
            f"{r['tokens_per_forward']:>7.2f} {r['drafted_tokens']:>7} {acc:>6} {cache:>6}  {same}"
        )
    print()
    for r in record["single_step"]:
        if r["status"] == "ok":
            print(
                f"single step, {r['model']}: {r['step_ms']:.2f} ms (p10 {r['step_ms_p10']:.2f}, p90 "
                f"{r['step_ms_p90']:.2f}; cache of {record['prompt_tokens']}, not recording)"
            )
        else:
            print(f"single step, {r['model']}: {r['status']}: {r.get('error', '')[:100]}")
    print("k steps = k x that median; crop rej keeps 1 of the k tokens, crop acc all of them")
    print(
        f"{'model':<7} {'k':>3} {'forward ms':>10} {'crop rej':>9} {'crop acc':>9} {'k steps ms':>10} "
        f"{'rej/steps':>9} {'acc/steps':>9}"
    )
    for r in record["verification"]:
        if r["status"] != "ok":
            print(f"{r['model']:<7} {r['k']:>3} {r['status']}: {r.get('error', '')[:100]}")
            continue
        print(
            f"{r['model']:<7} {r['k']:>3} {r['forward_ms']:>10.2f} {r['crop_reject_ms']:>9.2f} "
            f"{r['crop_accept_ms']:>9.2f} {r['k_steps_ms']:>10.2f} {r['ratio_reject']:>9.2f} {r['ratio_accept']:>9.2f}"
        )
    if record["skipped"]:
        names = "; ".join(s.split(":")[0] for s in record["skipped"])
        print(f"skipped for the time budget ({len(record['skipped'])}): {names[:400]}")
    print()
    for v in record["checks"].values():
        state = {True: "PASS", False: "FAIL", None: "n/a "}[v["pass"]]
        extra = {k: x for k, x in v.items() if k not in ("target", "pass") and x}
        print(f"{state} {v['target']}  {str(extra)[:300] if extra else ''}")


if __name__ == "__main__":
    main()
