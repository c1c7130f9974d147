"""GPU benchmark of swaa.kernels: correctness first, then prefill and single-token decode timings.

    python benchmarks/bench_kernels_gpu.py --out benchmarks/results/kernels_gpu_<device>.json

0. Runs the GPU tests (`pytest -m gpu tests/kernels/test_kernels_gpu.py`) and records their summary
   (skip with --no-tests).
1. Correctness: every timed op is first checked against the float64 oracle; an op that fails is
   reported as failing and not timed.
2. Prefill (bf16, H=16, K=V=128): `gla` / `linear_attn` through the dispatcher vs calling FLA's
   chunked kernel directly at T=4096 (B=4), and vs causal `scaled_dot_product_attention` at
   T = 2k, 8k, 32k with B*T = 16k (B=1 at 32k).
3. Decode, one token (bf16 inputs, float32 state, H=16, K=V=128, B=1 and 16): FLA's fused
   recurrent call vs swaa's paths ("auto" = swaa's one-kernel Triton step, the torch step, each
   with and without the public function's checks); eager host wall time per call (a loop of calls between two
   syncs), GPU time per call (CUDA events, triton's do_bench median, L2 flushed), and both again
   for one replay of a CUDA graph holding the call. The memory floor is the GPU time of reading
   and writing the float32 state once (a device copy).

All GPU times are medians after warm-up. The JSON holds the device, versions, shapes and numbers;
the table is printed last.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import torch
import torch.nn.functional as F
from common import pkg_version, progress, rel, wall_us

from swaa.kernels import fla_available, gla, linear_attn, naive_gla, naive_linear_attn
from swaa.kernels.fla_adapter import fla_version
from swaa.kernels.gla import gla_step_torch
from swaa.kernels.step_triton import decode_step_triton, triton_step_available

H, D = 16, 128
TOL = {torch.float32: 5e-3, torch.bfloat16: 2e-2}
# the timed dtype; --fp32-checks adds float32 (each dtype costs FLA minutes of autotuning on a fresh machine)
CHECK_DTYPES = [torch.bfloat16]


def gpu_ms(fn):
    import triton.testing

    return triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median")


def capture(fn):
    """A CUDA graph holding one call of `fn` (inputs are the tensors `fn` closes over)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph


def rand(B, T, K=D, V=D, dtype=torch.bfloat16, seed=0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    kw = dict(device="cuda", generator=gen)
    q = torch.randn(B, T, H, K, **kw).to(dtype)
    k = torch.randn(B, T, H, K, **kw).to(dtype)
    v = torch.randn(B, T, H, V, **kw).to(dtype)
    g = (F.logsigmoid(torch.randn(B, T, H, K, **kw)) / 16).to(dtype)
    S = torch.randn(B, H, K, V, **kw) * 0.1
    return q, k, v, g, S


def fla_ops():
    from fla.ops.gla import chunk_gla, fused_recurrent_gla
    from fla.ops.linear_attn import chunk_linear_attn, fused_recurrent_linear_attn

    return dict(
        chunk_gla=chunk_gla,
        fused_recurrent_gla=fused_recurrent_gla,
        chunk_linear_attn=chunk_linear_attn,
        fused_recurrent_linear_attn=fused_recurrent_linear_attn,
    )


def decode_fns(B):
    """The single-token callables to time: name -> (fn, what it computes)."""
    q, k, v, g, S = rand(B, 1)
    scale = D**-0.5
    fns = {
        "swaa gla auto": lambda: gla(q, k, v, g, initial_state=S, output_final_state=True),
        "swaa gla backend=torch (torch step)": lambda: gla(
            q, k, v, g, initial_state=S, output_final_state=True, backend="torch"
        ),
        "torch step, no checks": lambda: gla_step_torch(q, k, v, g, scale, S, True),
        "swaa linear_attn auto": lambda: linear_attn(q, k, v, initial_state=S, output_final_state=True),
    }
    if triton_step_available():
        fns["triton step, no checks"] = lambda: decode_step_triton(q, k, v, g, scale, S, True)
    if fla_available():
        ops = fla_ops()
        fns["FLA fused_recurrent_gla"] = lambda: ops["fused_recurrent_gla"](
            q, k, v, gk=g, scale=scale, initial_state=S, output_final_state=True
        )
        fns["swaa gla backend=fla"] = lambda: gla(
            q, k, v, g, initial_state=S, output_final_state=True, backend="fla"
        )
        fns["FLA fused_recurrent_linear_attn"] = lambda: ops["fused_recurrent_linear_attn"](
            q, k, v, scale=scale, initial_state=S, output_final_state=True
        )
    return fns, (q, k, v, g, S)


def correctness():
    """name -> dict(ok, errors): each op against the float64 oracle on inputs it will be timed on."""
    out = {}

    def record(name, errs, tol):
        out[name] = {"ok": all(e < tol for e in errs.values()), "rel_errors": errs, "tol": tol}
        progress(f"checked {name}: {errs}")

    # prefill paths (chunked, T > 64) and short paths (fused recurrent, T <= 64) through FLA
    if fla_available():
        for T in (40, 300):
            for dtype in CHECK_DTYPES:
                q, k, v, g, S = rand(2, T, dtype=dtype)
                ref = naive_gla(
                    *(x.double() for x in (q, k, v, g)), initial_state=S.double(), output_final_state=True
                )
                o, S1 = gla(q, k, v, g, initial_state=S, output_final_state=True, backend="fla")
                record(f"gla fla T={T} {dtype}", {"o": rel(o, ref[0]), "state": rel(S1, ref[1])}, TOL[dtype])
                for normalize in (False, True):
                    qp, kp = F.elu(q.float()).add(1).to(dtype), F.elu(k.float()).add(1).to(dtype)
                    st = (S, torch.rand(2, H, D, device="cuda")) if normalize else S
                    st64 = tuple(x.double() for x in st) if normalize else S.double()
                    ref = naive_linear_attn(
                        qp.double(),
                        kp.double(),
                        v.double(),
                        initial_state=st64,
                        output_final_state=True,
                        normalize=normalize,
                    )
                    o, S1 = linear_attn(
                        qp,
                        kp,
                        v,
                        initial_state=st,
                        output_final_state=True,
                        normalize=normalize,
                        backend="fla",
                    )
                    S1, r1 = (S1[0], ref[1][0]) if normalize else (S1, ref[1])
                    record(
                        f"linear_attn fla T={T} normalize={normalize} {dtype}",
                        {"o": rel(o, ref[0]), "state": rel(S1, r1)},
                        TOL[dtype],
                    )
    # the decode callables themselves, on their benchmark inputs
    fns, (q, k, v, g, S) = decode_fns(16)
    ref_gla = naive_gla(
        *(x.double() for x in (q, k, v, g)), initial_state=S.double(), output_final_state=True
    )
    ref_la = naive_linear_attn(
        *(x.double() for x in (q, k, v)), initial_state=S.double(), output_final_state=True
    )
    for name, fn in fns.items():
        o, S1 = fn()
        ref = ref_la if "linear_attn" in name else ref_gla
        record(f"decode {name}", {"o": rel(o, ref[0]), "state": rel(S1, ref[1])}, TOL[torch.bfloat16])
    return out


def bench_prefill(ok):
    rows = []
    if not fla_available():
        return rows
    ops = fla_ops()
    scale = D**-0.5
    # dispatcher overhead at T = 4096
    B, T = 4, 4096
    q, k, v, g, _ = rand(B, T)
    pairs = [
        ("gla", lambda: gla(q, k, v, g), lambda: ops["chunk_gla"](q, k, v, g, scale=scale), "gla fla T=300"),
        (
            "linear_attn",
            lambda: linear_attn(q, k, v),
            lambda: ops["chunk_linear_attn"](q, k, v, scale=scale, normalize=False),
            "linear_attn fla T=300",
        ),
    ]
    for name, ours, direct, check in pairs:
        if not all(r["ok"] for n, r in ok.items() if n.startswith(check)):
            rows.append({"bench": "prefill_vs_fla", "op": name, "skipped": "failed correctness"})
            continue
        a, b = gpu_ms(ours), gpu_ms(direct)
        rows.append(
            {
                "bench": "prefill_vs_fla",
                "op": name,
                "B": B,
                "T": T,
                "H": H,
                "D": D,
                "dtype": "bf16",
                "swaa_ms": a,
                "fla_direct_ms": b,
                "ratio": a / b,
                "within_5pct": a <= 1.05 * b,
            }
        )
        progress(f"timed prefill {rows[-1]}")
    # against causal softmax attention
    for T in (2048, 8192, 32768):
        rows.append(_prefill_vs_sdpa(T, ok))
        progress(f"timed prefill {rows[-1]}")
        torch.cuda.empty_cache()
    return rows


def _prefill_vs_sdpa(T, ok):
    B = max(1, 16384 // T)
    q, k, v, g, _ = rand(B, T)
    qs, ks, vs = (x.transpose(1, 2).contiguous() for x in (q, k, v))
    sdpa = gpu_ms(lambda: F.scaled_dot_product_attention(qs, ks, vs, is_causal=True))
    row = {"bench": "prefill_vs_sdpa", "B": B, "T": T, "H": H, "D": D, "dtype": "bf16", "sdpa_ms": sdpa}
    for name, fn in (("gla", lambda: gla(q, k, v, g)), ("linear_attn", lambda: linear_attn(q, k, v))):
        if all(r["ok"] for n, r in ok.items() if n.startswith(f"{name} fla")):
            row[f"{name}_ms"] = gpu_ms(fn)
            row[f"{name}_over_sdpa"] = row[f"{name}_ms"] / sdpa
    return row


def _memory_floor_us(S):
    out = torch.empty_like(S)
    return gpu_ms(lambda: out.copy_(S)) * 1e3


def bench_decode(ok):
    rows = []
    for B in (1, 16):
        fns, (q, k, v, g, S) = decode_fns(B)
        floor = _memory_floor_us(S)
        for name, fn in fns.items():
            row = {"bench": "decode", "op": name, "B": B, "H": H, "K": D, "V": D, "floor_us": floor}
            # correctness was checked at B = 16 on the same callables
            if not ok.get(f"decode {name}", {"ok": False})["ok"]:
                row["skipped"] = "failed correctness"
                rows.append(row)
                continue
            row["eager_wall_us"] = wall_us(fn, calls=500, warmup=20)
            row["eager_gpu_us"] = gpu_ms(fn) * 1e3
            try:
                graph = capture(fn)
                row["graph_wall_us"] = wall_us(graph.replay, calls=500, warmup=20)
                row["graph_gpu_us"] = gpu_ms(graph.replay) * 1e3
            except Exception as e:  # an op that cannot be captured is a result, not a crash
                row["graph_error"] = f"{type(e).__name__}: {e}"[:200]
            rows.append(row)
    return rows


def run_gpu_tests():
    """Run the kernels' GPU tests in a subprocess; returns (ok, summary line, FAILED lines)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-m",
            "gpu",
            "-q",
            "-p",
            "no:cacheprovider",
            os.path.join(root, "tests", "kernels", "test_kernels_gpu.py"),
        ],
        cwd=root,
        capture_output=True,
        text=True,
    )
    lines = [ln for ln in proc.stdout.strip().splitlines() if ln.strip()]
    failures = [ln for ln in lines if ln.startswith("FAILED")]
    return proc.returncode == 0, (lines[-1] if lines else proc.stderr[-500:]), failures


def fmt(x, nd=3):
    return "-" if x is None else (f"{x:.{nd}f}" if isinstance(x, float) else str(x))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="path of the JSON results file")
    ap.add_argument("--skip-prefill", action="store_true")
    ap.add_argument("--fp32-checks", action="store_true", help="also check FLA in float32 before timing")
    ap.add_argument(
        "--no-tests", action="store_true", help="do not run tests/kernels/test_kernels_gpu.py first"
    )
    args = ap.parse_args()
    if args.fp32_checks:
        CHECK_DTYPES.insert(0, torch.float32)
    if not torch.cuda.is_available():
        raise SystemExit("bench_kernels_gpu.py needs a CUDA GPU")
    meta = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": pkg_version("triton"),
        "transformers": pkg_version("transformers"),
        "fla": fla_version(),
        "fla_available": fla_available(),
    }
    tests = None
    if not args.no_tests:
        passed, summary, failures = run_gpu_tests()
        tests = {"ok": passed, "summary": summary, "failures": failures}
    ok = correctness()
    prefill = [] if args.skip_prefill else bench_prefill(ok)
    decode = bench_decode(ok)
    result = {"meta": meta, "gpu_tests": tests, "correctness": ok, "prefill": prefill, "decode": decode}
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)

    print(f"device: {meta['device']}  torch {meta['torch']}  triton {meta['triton']}  fla {meta['fla']}")
    if tests is not None:
        print(
            f"\nGPU tests (tests/kernels/test_kernels_gpu.py): {'PASS' if tests['ok'] else 'FAIL'}  {tests['summary']}"
        )
        for line in tests["failures"]:
            print(f"  {line}")
    print("\ncorrectness (relative error vs float64 oracle)")
    for name, r in ok.items():
        errs = " ".join(f"{k}={v:.2e}" for k, v in r["rel_errors"].items())
        print(f"  {'PASS' if r['ok'] else 'FAIL'}  {name:55s} {errs}  (tol {r['tol']:g})")
    print("\nprefill, bf16, H=16, D=128 (GPU ms, median)")
    for r in prefill:
        if r["bench"] == "prefill_vs_fla":
            if "skipped" in r:
                print(f"  {r['op']:12s} vs FLA direct: skipped ({r['skipped']})")
            else:
                print(
                    f"  {r['op']:12s} B={r['B']} T={r['T']}: swaa {fmt(r['swaa_ms'])}  FLA {fmt(r['fla_direct_ms'])}"
                    f"  ratio {fmt(r['ratio'])}  within 5%: {r['within_5pct']}"
                )
        else:
            print(
                f"  T={r['T']:6d} B={r['B']}: sdpa {fmt(r['sdpa_ms'])}  gla {fmt(r.get('gla_ms'))}"
                f" ({fmt(r.get('gla_over_sdpa'), 2)}x)  linear_attn {fmt(r.get('linear_attn_ms'))}"
                f" ({fmt(r.get('linear_attn_over_sdpa'), 2)}x)"
            )
    print("\ndecode, one token, bf16 in / fp32 state, H=16, K=V=128 (us per call, median)")
    print(
        f"  {'op':38s} {'B':>3s} {'eager wall':>11s} {'eager GPU':>10s} {'graph wall':>11s} {'graph GPU':>10s} {'floor':>7s}"
    )
    for r in decode:
        if "skipped" in r:
            print(f"  {r['op']:38s} {r['B']:3d}  skipped ({r['skipped']})")
            continue
        gw = fmt(r.get("graph_wall_us"), 1) if "graph_error" not in r else "no capture"
        print(
            f"  {r['op']:38s} {r['B']:3d} {fmt(r['eager_wall_us'], 1):>11s} {fmt(r['eager_gpu_us'], 1):>10s}"
            f" {gw:>11s} {fmt(r.get('graph_gpu_us'), 1):>10s} {fmt(r['floor_us'], 1):>7s}"
        )
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
