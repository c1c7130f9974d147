"""The layers on CUDA: backend="fla" (FLA's Triton kernels and fused output norm) against backend="torch"
in bf16, on forward, state and every gradient, with left-padded batches. Needs a GPU and fla-core."""

import copy

import pytest
import torch
from transformers import DynamicCache

from swaa.kernels import fla_available
from swaa.layers import GatedLinearAttention, LinearAttention

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
    pytest.mark.skipif(
        torch.cuda.is_available() and not fla_available(), reason="needs fla-core (pip install fla-core)"
    ),
]

TOL = (
    2e-2  # relative (norm) difference allowed between FLA's bf16 kernels and the float32-internal torch path
)
# tests/conftest.py's tiny Qwen3 widened to FLA-sized heads: 4 query / 2 key-value heads of 64 dims
WIDE = dict(hidden_size=256, head_dim=64, attention_bias=False)

VARIANTS = [
    pytest.param(GatedLinearAttention, {}, id="gla-default"),
    pytest.param(GatedLinearAttention, dict(output_gate=True), id="gla-norm-gate"),
    pytest.param(GatedLinearAttention, dict(gate="from_keys", output_norm=False), id="gla-fromkeys"),
    pytest.param(LinearAttention, {}, id="linear-default"),
    pytest.param(
        LinearAttention, dict(feature_map="elu", normalize=False, output_norm=True), id="linear-elu-onorm"
    ),
    pytest.param(LinearAttention, dict(feature_map="hedgehog"), id="linear-hedgehog"),
]


def rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def rope(B, T, D, start=0):
    pos = torch.arange(start, start + T, device="cuda", dtype=torch.float32)
    inv = 1.0 / (10000 ** (torch.arange(0, D, 2, device="cuda", dtype=torch.float32) / D))
    ang = torch.cat([pos[:, None] * inv] * 2, -1)
    return ang.cos().bfloat16().expand(B, T, D), ang.sin().bfloat16().expand(B, T, D)


def states(cache):
    s = cache.get_recurrent_state(0)
    return s if isinstance(s, tuple) else (s,)


@pytest.mark.parametrize("cls, opts", VARIANTS)
def test_fla_backend_matches_torch_backend_in_bf16(cls, opts, tiny_config):
    torch.manual_seed(0)
    config = tiny_config("qwen3", **WIDE)
    fla = cls(config, 0, backend="fla", **opts).cuda().bfloat16()
    ref = copy.deepcopy(fla)
    ref.backend = "torch"

    # T not a multiple of FLA's chunk (64); rows padded on the left by different amounts
    B, T, D = 3, 300, config.head_dim
    x = torch.randn(B, T, config.hidden_size, device="cuda", dtype=torch.bfloat16)
    mask = torch.ones(B, T, dtype=torch.long, device="cuda")
    mask[1, :37] = 0
    mask[2, :250] = 0
    nxt = torch.randn(B, 1, config.hidden_size, device="cuda", dtype=torch.bfloat16)

    results = {}
    for name, layer in (("fla", fla), ("torch", ref)):
        xi = x.clone().requires_grad_()
        cache = DynamicCache()
        out, _ = layer(xi, attention_mask=mask, past_key_values=cache, position_embeddings=rope(B, T, D))
        # a fixed, non-uniform weighting of the real positions' outputs (padding outputs are unspecified)
        weight = torch.linspace(-1, 1, out.shape[-1], device="cuda") * mask[..., None]
        (out.float() * weight).sum().backward()
        with torch.no_grad():
            step, _ = layer(nxt, past_key_values=cache, position_embeddings=rope(B, 1, D, start=T))
        results[name] = dict(
            out=out.detach(),
            step=step,
            states=states(cache),
            grads={"x": xi.grad, **{n: p.grad for n, p in layer.named_parameters()}},
        )
    f, t = results["fla"], results["torch"]
    real = mask.bool()
    assert rel(f["out"][real], t["out"][real]) < TOL
    assert rel(f["step"], t["step"]) < TOL
    for a, b in zip(f["states"], t["states"]):
        assert a.dtype == torch.float32 and rel(a, b) < TOL
    for name, g in t["grads"].items():
        assert g is not None and f["grads"][name] is not None, name
        assert rel(f["grads"][name], g) < TOL, name


@pytest.mark.parametrize("cls", [GatedLinearAttention, LinearAttention], ids=["gla", "linear"])
def test_packed_sequences_on_fla_equal_each_sequence_alone(cls, tiny_config):
    # packed rows (position_ids falling back to 0) go through FLA's varlen kernels; each sequence must come
    # out as if run alone, forward and gradients
    torch.manual_seed(0)
    config = tiny_config("qwen3", **WIDE)
    layer = cls(config, 0, backend="fla").cuda().bfloat16()
    D, lengths = config.head_dim, [70, 5, 129]
    x = torch.randn(1, sum(lengths), config.hidden_size, device="cuda", dtype=torch.bfloat16)
    position_ids = torch.cat([torch.arange(n, device="cuda") for n in lengths])[None]
    cos, sin = rope(1, max(lengths), D)
    pe = tuple(torch.cat([t[:, :n] for n in lengths], dim=1) for t in (cos, sin))
    xi = x.clone().requires_grad_()
    packed, _ = layer(xi, position_ids=position_ids, position_embeddings=pe)
    packed.float().sum().backward()
    start = 0
    for n in lengths:
        xa = x[:, start : start + n].clone().requires_grad_()
        alone, _ = layer(xa, position_embeddings=(cos[:, :n], sin[:, :n]))
        alone.float().sum().backward()
        assert rel(packed[:, start : start + n], alone) < TOL
        assert rel(xi.grad[:, start : start + n], xa.grad) < TOL
        start += n
