"""CPU benchmark of swaa.kernels: the chunked torch form vs the naive token loop.

    python benchmarks/bench_kernels_cpu.py --out benchmarks/results/kernels_cpu.json

Checks first that the chunked form equals the float64 oracle (an op that fails is not timed),
then times forward with final state at B=1, H=8, K=V=64, float32: the naive loop vs the
chunked form at T=2048 (the issue's target: >= 8x), and the chunked form's growth with T
(should be linear). Strong gates (-20 per token) are timed too: the realistic gates take the
plain chunked form (per-chunk decay spans within e^30), the strong ones the form built from
products of gates, so that column is the cost of the safeguard.
Medians of wall time after warm-up; the JSON holds the machine, versions, shapes and numbers;
the table is printed last. On a shared machine, other processes make multi-threaded timings
erratic (threads wait for each other at every op); `--threads 1` gives a stable comparison.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch
import torch.nn.functional as F
from common import cpu_name, pkg_version

from swaa.kernels import gla, linear_attn, naive_gla, naive_linear_attn

B, H, K, V = 1, 8, 64, 64
# the fastest run of each median_ms call, kept for the JSON: on a shared machine the median can
# catch other processes' bursts, the minimum shows the code's own cost
MINIMA = []


def median_ms(fn, x, repeats):
    fn(*x)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn(*x)
        times.append((time.perf_counter() - t0) * 1e3)
    MINIMA.append(min(times))
    return statistics.median(times)


def inputs(T, dtype=torch.float32, strong=False, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q, k = torch.randn(B, T, H, K, generator=gen), torch.randn(B, T, H, K, generator=gen)
    v = torch.randn(B, T, H, V, generator=gen)
    g = (
        torch.full((B, T, H, K), -20.0)
        if strong
        else F.logsigmoid(torch.randn(B, T, H, K, generator=gen)) / 16
    )
    return [x.to(dtype) for x in (q, k, v, g)]


def ops():
    """name -> (fast, naive), each a callable of (q, k, v, g) returning (o, final_state)."""
    return {
        "gla": (
            lambda q, k, v, g: gla(q, k, v, g, output_final_state=True, backend="torch"),
            lambda q, k, v, g: naive_gla(q, k, v, g, output_final_state=True),
        ),
        "linear_attn": (
            lambda q, k, v, g: linear_attn(q, k, v, output_final_state=True, backend="torch"),
            lambda q, k, v, g: naive_linear_attn(q, k, v, output_final_state=True),
        ),
        "linear_attn normalized": (
            lambda q, k, v, g: linear_attn(
                F.elu(q) + 1, F.elu(k) + 1, v, output_final_state=True, normalize=True, backend="torch"
            ),
            lambda q, k, v, g: naive_linear_attn(
                F.elu(q) + 1, F.elu(k) + 1, v, output_final_state=True, normalize=True
            ),
        ),
    }


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def check(name, fast, naive):
    worst = 0.0
    for T, strong in ((1, False), (65, False), (300, False), (300, True)):
        x = inputs(T, torch.float64, strong)
        (o, S), (o_ref, S_ref) = fast(*x), naive(*x)
        S, S_ref = (S[0], S_ref[0]) if isinstance(S, tuple) else (S, S_ref)
        worst = max(worst, rel(o, o_ref), rel(S, S_ref))
    return {"ok": worst < 1e-10, "max_rel_error_float64": worst}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="path of the JSON results file")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--max-naive-t", type=int, default=4096, help="longest T to time the naive loop at")
    ap.add_argument(
        "--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)"
    )
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    meta = {
        "device": cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": pkg_version("transformers"),
        "triton": pkg_version("triton"),
        "fla": pkg_version("fla-core"),
        "shape": {"B": B, "H": H, "K": K, "V": V, "dtype": "float32", "output_final_state": True},
    }
    checks, rows = {}, []
    for name, (fast, naive) in ops().items():
        checks[name] = check(name, fast, naive)
        if not checks[name]["ok"]:
            continue
        for T in (512, 1024, 2048, 4096, 8192, 16384):
            x = inputs(T)
            row = {
                "op": name,
                "T": T,
                "chunked_ms": median_ms(fast, x, args.repeats),
                "chunked_min_ms": MINIMA[-1],
            }
            if T <= args.max_naive_t:
                row["naive_ms"] = median_ms(naive, x, max(3, args.repeats // 2))
                row["naive_min_ms"] = MINIMA[-1]
                row["speedup"] = row["naive_ms"] / row["chunked_ms"]
                row["speedup_of_minima"] = row["naive_min_ms"] / row["chunked_min_ms"]
            if name == "gla":
                xs = inputs(T, strong=True)
                row["chunked_strong_gates_ms"] = median_ms(fast, xs, args.repeats)
            rows.append(row)
    with open(args.out, "w") as f:
        json.dump({"meta": meta, "correctness": checks, "results": rows}, f, indent=2)

    print(
        f"device: {meta['device']} ({meta['cpu_count']} cores, {meta['torch_threads']} torch threads), "
        f"torch {meta['torch']}"
    )
    for name, c in checks.items():
        verdict = "PASS" if c["ok"] else "FAIL (not timed)"
        print(
            f"  {verdict}  {name}: chunked vs float64 oracle, max rel error {c['max_rel_error_float64']:.1e}"
        )
    print(f"\nforward + final state, B={B} H={H} K=V={K} float32 (median ms)")
    print(
        f"  {'op':24s} {'T':>6s} {'chunked':>9s} {'naive':>9s} {'speedup':>8s} {'ms/1k tok':>9s} {'strong g':>9s}"
    )
    for r in rows:
        print(
            f"  {r['op']:24s} {r['T']:6d} {r['chunked_ms']:9.2f} "
            f"{r.get('naive_ms', float('nan')):9.1f} {r.get('speedup', float('nan')):7.1f}x "
            f"{r['chunked_ms'] / r['T'] * 1000:9.2f} {r.get('chunked_strong_gates_ms', float('nan')):9.2f}"
        )
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
