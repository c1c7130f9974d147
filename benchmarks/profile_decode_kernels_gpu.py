"""How many CUDA kernels one decode step of one attention module launches, and what it costs in eager
mode (issue 10, item 4): Qwen3's attention (SDPA, DynamicCache) against a converted GLA layer on its
unfused path and on the fused decode step, Qwen3-1.7B's attention shape, bf16, B=1, 1024 tokens of context.

Kernels are counted with the torch profiler (CUDA kernel events of one step after warm-up); the time per
step is the median of CUDA-event timings of 200 steps (host launch cost included, which is what eager
decode is bound by). Prints a table, writes JSON.

    python benchmarks/profile_decode_kernels_gpu.py --out benchmarks/results/decode_kernels_gpu_<device>.json
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch
from torch.profiler import ProfilerActivity, profile
from transformers import DynamicCache, Qwen3Config, StaticCache
from transformers.models.qwen3.modeling_qwen3 import Qwen3Attention, Qwen3RotaryEmbedding

import swaa.kernels
from swaa.layers import GatedLinearAttention

CONTEXT = 1024
# the static cases decode 1 + 20 + 200 tokens after the prompt: their cache holds all of them


def config():
    c = Qwen3Config(
        hidden_size=2048, num_attention_heads=16, num_key_value_heads=8, head_dim=128, num_hidden_layers=1,
        intermediate_size=6144, vocab_size=1000, max_position_embeddings=40960,
    )  # fmt: skip
    c._attn_implementation = "sdpa"
    return c


def case(name, module, cache, rot, dtype):
    try:
        return _case(name, module, cache, rot, dtype)
    except Exception as err:  # one failing case must not hide the others
        return {
            "case": name,
            "kernels": -1,
            "us_per_step": float("nan"),
            "error": f"{type(err).__name__}: {err}",
        }


def _case(name, module, cache, rot, dtype):
    x = torch.randn(1, CONTEXT, 2048, device="cuda", dtype=dtype)
    step = torch.randn(1, 1, 2048, device="cuda", dtype=dtype)
    pe_prefill = rot(x, torch.arange(CONTEXT, device="cuda")[None])
    pe = rot(step, torch.tensor([[CONTEXT]], device="cuda"))
    kw = {"past_key_values": cache, "cache": cache}  # 4.x / 5.x spellings; the other is ignored
    with torch.no_grad():
        module(x, position_embeddings=pe_prefill, attention_mask=None, **kw)
        for _ in range(20):
            module(step, position_embeddings=pe, attention_mask=None, **kw)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            module(step, position_embeddings=pe, attention_mask=None, **kw)
            torch.cuda.synchronize()
        kernels = sum(e.count for e in prof.key_averages() if e.device_type.name == "CUDA")
        times = []
        for _ in range(200):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            module(step, position_embeddings=pe, attention_mask=None, **kw)
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b) * 1000)
    return {"case": name, "kernels": kernels, "us_per_step": statistics.median(times)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    dtype = torch.bfloat16
    c = config()
    rot = Qwen3RotaryEmbedding(c).cuda()
    rows = []
    qwen3 = Qwen3Attention(c, 0).cuda().to(dtype).eval()
    rows.append(case("qwen3 attention (sdpa), DynamicCache", qwen3, DynamicCache(), rot, dtype))
    gla = GatedLinearAttention(c, 0).cuda().to(dtype).eval()
    fused = swaa.kernels.fused_step_available
    for label, on in (("unfused", False), ("fused", True)):
        swaa.kernels.fused_step_available = fused if on else (lambda t: False)
        try:
            rows.append(case(f"gla layer, {label}, DynamicCache", gla, DynamicCache(), rot, dtype))
            static = StaticCache(config=c, max_cache_len=CONTEXT + 512)
            rows.append(case(f"gla layer, {label}, StaticCache", gla, static, rot, dtype))
        finally:
            swaa.kernels.fused_step_available = fused
    device = torch.cuda.get_device_name()
    print(f"device: {device}; one decode step at {CONTEXT} tokens, bf16, B=1")
    print(f"{'case':<44} {'kernels':>8} {'us/step':>9}")
    for r in rows:
        print(f"{r['case']:<44} {r['kernels']:>8} {r['us_per_step']:>9.1f} {r.get('error', '')}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(
                {"device": device, "torch": torch.__version__, "context": CONTEXT, "rows": rows}, f, indent=1
            )


if __name__ == "__main__":
    main()
