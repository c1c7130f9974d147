"""Host cost of one compiled decode call with the graph's own work taken out (issue 10's B=1 1k miss): what
dynamo does around a CUDA-graph replay at every step, its guards, the graph's arguments and the Python
writes it replays after the graph, measured on the CPU.

    OMP_NUM_THREADS=1 python benchmarks/probe_compiled_host_cpu.py --out benchmarks/results/probe_compiled_host_cpu.json

A 28-layer Qwen3 of tiny width (the layer count of Qwen3-1.7B, so the guard tree has its size) and its
every:4 GLA hybrid, each with a static cache after an eager prefill. The decode step (`model(ids,
position_ids, cache)`) is compiled `fullgraph=True` with a backend that runs the graph once and then hands
back the same outputs, so each call's time is dynamo's alone. Median over `--repeats` loops of `--calls`
calls, in us; with and without `torch.compiler.skip_guard_on_all_nn_modules_unsafe` (module guards off).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time

import torch
from common import cpu_name, pkg_version, progress

SHAPE = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=28,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=512,
)


def replaying_backend(info: dict):
    def backend(gm, example_inputs):
        info["graphs"] += 1
        info["graph_inputs"] = len(example_inputs)
        kept = {}

        def run(*args):
            if "out" not in kept:
                kept["out"] = gm(*args)
            return kept["out"]

        return run

    return backend


def per_call_us(model, module_guards: bool, calls: int, repeats: int) -> dict:
    from transformers import StaticCache

    cache = StaticCache(config=model.config, max_cache_len=64)
    with torch.no_grad():
        model(input_ids=torch.zeros(1, 8, dtype=torch.long), past_key_values=cache, use_cache=True)

    def step(tok, pos, cache):
        return model(input_ids=tok, position_ids=pos, past_key_values=cache, use_cache=True).logits

    info = {"graphs": 0, "graph_inputs": None}
    options = (
        None if module_guards else {"guard_filter_fn": torch.compiler.skip_guard_on_all_nn_modules_unsafe}
    )
    torch._dynamo.reset()
    fn = torch.compile(step, backend=replaying_backend(info), fullgraph=True, options=options)
    tok, pos = torch.zeros(1, 1, dtype=torch.long), torch.tensor([[8]])
    times = []
    with torch.no_grad():
        for _ in range(3):
            fn(tok, pos, cache)
        for _ in range(repeats):
            t0 = time.perf_counter()
            for _ in range(calls):
                fn(tok, pos, cache)
            times.append((time.perf_counter() - t0) / calls * 1e6)
    return {"us_per_call": statistics.median(times), "min_us": min(times), **info}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="path of the JSON results file")
    ap.add_argument("--calls", type=int, default=200)
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()
    from transformers import Qwen3Config, Qwen3ForCausalLM

    import swaa

    torch.manual_seed(0)
    qwen3 = Qwen3ForCausalLM(Qwen3Config(**SHAPE)).eval()
    models = {"qwen3": qwen3, "hybrid": swaa.convert_to_hybrid(copy.deepcopy(qwen3), "every:4", kind="gla")}
    rows = []
    for module_guards in (True, False):
        for name, model in models.items():
            row = {"model": name, "module_guards": module_guards}
            row.update(per_call_us(model, module_guards, args.calls, args.repeats))
            rows.append(row)
            progress(
                f"{name:7s} module guards {'on ' if module_guards else 'off'} {row['us_per_call']:7.1f} us"
            )
    record = {
        "benchmark": "probe_compiled_host_cpu",
        "cpu": cpu_name(),
        "threads": torch.get_num_threads(),
        "versions": {"torch": torch.__version__, "transformers": pkg_version("transformers")},
        "shape": SHAPE,
        "results": rows,
    }
    with open(args.out, "w") as f:
        json.dump(record, f, indent=1)
    print(f"\n{'model':<8} {'module guards':<14} {'us/call':>8} {'min us':>8} {'graph inputs':>12}")
    for r in rows:
        print(
            f"{r['model']:<8} {'on' if r['module_guards'] else 'off':<14} {r['us_per_call']:8.1f} "
            f"{r['min_us']:8.1f} {r['graph_inputs']:>12}"
        )


if __name__ == "__main__":
    main()
