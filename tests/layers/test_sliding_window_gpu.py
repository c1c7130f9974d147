"""The sliding-window layers on CUDA: backend="fla" (FLA's kernels for the linear part, SDPA for the window)
against backend="torch" in bf16, and against a float64 copy on CPU; forward with left padding, decode
steps across the window boundary, states and every gradient; packed sequences through FLA's varlen
kernels; compiled static-cache generate (CUDA graphs). Needs a GPU and fla-core."""

import copy

import pytest
import torch
from transformers import DynamicCache, Qwen3Config, Qwen3ForCausalLM

from swaa.convert import convert_to_hybrid
from swaa.kernels import fla_available
from swaa.layers import SlidingWindowGatedLinearAttention, SlidingWindowLinearAttention

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
    pytest.mark.skipif(
        torch.cuda.is_available() and not fla_available(), reason="needs fla-core (pip install fla-core)"
    ),
]

# relative (norm) difference allowed between bf16 FLA and the torch path, as in test_layers_gpu.py
TOL = 2e-2
# tests/conftest.py's tiny Qwen3 widened to FLA-sized heads: 4 query / 2 key-value heads of 64 dims
WIDE = dict(hidden_size=256, head_dim=64, attention_bias=False)
VARIANTS = [
    pytest.param(SlidingWindowGatedLinearAttention, {}, id="swa_gla"),
    pytest.param(
        SlidingWindowGatedLinearAttention, dict(gate="from_keys", output_gate=True), id="swa_gla-fk"
    ),
    pytest.param(SlidingWindowLinearAttention, {}, id="swa_linear"),
    pytest.param(SlidingWindowLinearAttention, dict(feature_map="hedgehog"), id="swa_linear-hedgehog"),
]


def rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def rope(B, T, D, start=0, device="cuda", dtype=torch.bfloat16):
    pos = torch.arange(start, start + T, device=device, dtype=torch.float32)
    inv = 1.0 / (10000 ** (torch.arange(0, D, 2, device=device, dtype=torch.float32) / D))
    ang = torch.cat([pos[:, None] * inv] * 2, -1)
    return ang.cos().to(dtype).expand(B, T, D), ang.sin().to(dtype).expand(B, T, D)


def run(layer, x, mask, nxt, D, dtype):
    """Prefill with grads, then 3 decode steps (the window is 64: T=300 is past it; the short row is not)."""
    B, T, _ = x.shape
    xi = x.clone().requires_grad_()
    cache = DynamicCache()
    out, _ = layer(
        xi,
        attention_mask=mask,
        past_key_values=cache,
        position_embeddings=rope(B, T, D, device=x.device, dtype=dtype),
    )
    weight = torch.linspace(-1, 1, out.shape[-1], device=x.device) * mask[..., None]
    (out.float() * weight).sum().backward()
    steps = []
    with torch.no_grad():
        for i in range(nxt.shape[1]):
            m = torch.cat([mask, torch.ones(B, i + 1, dtype=mask.dtype, device=mask.device)], 1)
            pe = rope(B, 1, D, start=T + i, device=x.device, dtype=dtype)
            steps.append(
                layer(nxt[:, i : i + 1], attention_mask=m, past_key_values=cache, position_embeddings=pe)[0]
            )
    grads = {"x": xi.grad, **{n: p.grad for n, p in layer.named_parameters()}}
    return out.detach(), torch.cat(steps, 1), cache.get_recurrent_state(0), grads


@pytest.mark.parametrize("cls, opts", VARIANTS)
def test_fla_backend_matches_torch_and_float64(cls, opts, tiny_config):
    torch.manual_seed(0)
    config = tiny_config("qwen3", **WIDE)
    fla = cls(config, 0, backend="fla", **opts).cuda().bfloat16()
    ref = copy.deepcopy(fla)
    ref.backend = "torch"
    exact = copy.deepcopy(fla).double().cpu()
    exact.backend = "torch"
    B, T, D = 3, 300, config.head_dim
    x = torch.randn(B, T, config.hidden_size, device="cuda", dtype=torch.bfloat16)
    mask = torch.ones(B, T, dtype=torch.long, device="cuda")
    mask[1, :37] = 0
    mask[2, :250] = 0  # 50 real tokens: never past the window
    nxt = torch.randn(B, 3, config.hidden_size, device="cuda", dtype=torch.bfloat16)
    f = run(fla, x, mask, nxt, D, torch.bfloat16)
    t = run(ref, x, mask, nxt, D, torch.bfloat16)
    e = run(exact, x.double().cpu(), mask.cpu(), nxt.double().cpu(), D, torch.float64)
    real = mask.bool()
    # against float64: bf16 gradients through q/k norms and softmax sit up to ~5e-2 off (README, layers)
    for other, grad_tol in ((t, TOL), (e, 6e-2)):
        assert rel(f[0][real], other[0].to(f[0].device)[real]) < TOL
        assert rel(f[1], other[1].to(f[1].device)) < TOL
        for a, b in zip(f[2], other[2]):
            if a.dtype == torch.bool:
                assert torch.equal(a.cpu(), b.cpu())
            else:
                assert rel(a, b.to(a.device)) < TOL
        for name, g in other[3].items():
            assert g is not None and f[3][name] is not None, name
            assert rel(f[3][name], g.to(f[3][name].device)) < grad_tol, name
    assert f[2][0].dtype == torch.float32


@pytest.mark.parametrize("cls", [SlidingWindowGatedLinearAttention, SlidingWindowLinearAttention])
def test_packed_sequences_on_fla_equal_each_sequence_alone(cls, tiny_config):
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


@pytest.mark.parametrize("kind", ["swa_gla", "swa_linear"])
def test_compiled_static_generate_gives_the_dynamic_tokens(kind):
    torch._dynamo.reset()
    torch.manual_seed(0)
    config = Qwen3Config(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
    )
    model = convert_to_hybrid(Qwen3ForCausalLM(config).eval(), [0, 1, 3], kind=kind, window=8).cuda()
    model.generation_config.eos_token_id = None
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 128, (2, 9), generator=g).cuda()
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    kwargs = dict(attention_mask=mask, max_new_tokens=16, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        dynamic = model.generate(ids, **kwargs)
        for _ in range(2):  # the second call replays graphs recorded by the first
            assert torch.equal(model.generate(ids, cache_implementation="static", **kwargs), dynamic)
