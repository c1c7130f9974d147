"""The fused decode step (one kernel from the raw projections to the read-out) computes what a layer's
unfused decode step computes: its torch twin against the kernels' float64 oracle, and a layer forced
onto the fused path against the same layer unfused, on dynamic and static caches, with grouped kv
heads, q/k norms, rotary embeddings, the gate and padding. The Triton kernel itself runs on CUDA
(tests marked gpu) and, where triton is installed, under Triton's interpreter on CPU."""

import os

import pytest
import torch
from transformers import DynamicCache, Qwen3Config, StaticCache

import swaa.kernels
from swaa.kernels import fused_decode_step_torch, naive_gla
from swaa.layers import GatedLinearAttention, LinearAttention


def raw_inputs(B=3, H=4, Hk=2, D=8, V=8, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)

    def r(*shape, scale=1.0):
        return (scale * torch.randn(*shape, generator=g)).to(dtype)

    return dict(
        q=r(B, 1, H, D), k=r(B, 1, Hk, D), v=r(B, 1, Hk, V), gate_logits=r(B, 1, Hk, D, scale=2.0),
        state=r(B, H, D, V), q_norm_weight=r(D).abs() + 0.5, k_norm_weight=r(D).abs() + 0.5,
        cos=r(B, 1, D), sin=r(B, 1, D),
    )  # fmt: skip


def rms(x, w, eps=1e-6):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def rotate(x, cos, sin):
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), -1) * sin


def test_the_torch_twin_equals_the_recurrence_applied_by_hand():
    x = raw_inputs()
    keep = torch.tensor([True, False, True])
    o, S = fused_decode_step_torch(
        x["q"], x["k"], x["v"], x["gate_logits"], state=x["state"].clone(), scale=0.3, gate_normalizer=4.0,
        q_norm_weight=x["q_norm_weight"], k_norm_weight=x["k_norm_weight"], cos=x["cos"], sin=x["sin"], keep=keep,
    )  # fmt: skip
    # the same token by hand: norm, rotate, pad, expand the kv heads, then the kernels' float64 oracle
    q = rotate(rms(x["q"], x["q_norm_weight"]), x["cos"][:, :, None], x["sin"][:, :, None])
    k = rotate(rms(x["k"], x["k_norm_weight"]), x["cos"][:, :, None], x["sin"][:, :, None])
    g = torch.nn.functional.logsigmoid(x["gate_logits"]) / 4.0
    row = keep[:, None, None, None].to(q.dtype)
    k, v, g = k * row, x["v"] * row, g * row
    k, v, g = (t.repeat_interleave(2, dim=2) for t in (k, v, g))
    o_ref, S_ref = naive_gla(q, k, v, g, scale=0.3, initial_state=x["state"], output_final_state=True)
    torch.testing.assert_close(o, o_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(S, S_ref, rtol=1e-12, atol=1e-12)


def test_the_twin_writes_in_place_or_into_the_buffer_it_is_given():
    x = raw_inputs()
    state = x.pop("state")
    kept = state.clone()
    out = torch.empty_like(state)
    _, S = fused_decode_step_torch(**x, state=state, scale=0.5, state_out=out)
    assert S is out and torch.equal(state, kept)
    _, S2 = fused_decode_step_torch(**x, state=state, scale=0.5)
    assert S2 is state and torch.equal(S2, out)


@pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1", reason="the Triton kernel on CPU needs TRITON_INTERPRET=1"
)
def test_the_triton_kernel_equals_the_twin_under_the_interpreter():
    pytest.importorskip("triton")
    from swaa.kernels.fused_step import _fused_decode_triton

    for dtype in (torch.float32,):
        x = raw_inputs(B=2, H=6, Hk=3, D=16, V=40, dtype=dtype)
        keep = torch.tensor([True, False])
        o1, S1 = fused_decode_step_torch(**{**x, "state": x["state"].clone()}, scale=0.3, keep=keep)
        o2, S2 = _fused_decode_triton(
            x["q"], x["k"], x["v"], x["gate_logits"], x["state"], 0.3, 1.0, x["q_norm_weight"],
            x["k_norm_weight"], 1e-6, x["cos"], x["sin"], keep, None,
        )  # fmt: skip
        torch.testing.assert_close(o2, o1, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(S2, S1, rtol=1e-5, atol=1e-5)


CONFIG = Qwen3Config(
    vocab_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, head_dim=8,
)  # fmt: skip

LAYERS = [
    pytest.param(GatedLinearAttention, {}, id="gla-default"),
    pytest.param(GatedLinearAttention, dict(output_gate=True, gate_logit_normalizer=4.0), id="gla-ogate"),
    pytest.param(LinearAttention, dict(feature_map="identity", normalize=False), id="linear-identity"),
]


def rope(B, T, start, D=8):
    pos = torch.arange(start, start + T, dtype=torch.float64)
    inv = 1.0 / (10000 ** (torch.arange(0, D, 2, dtype=torch.float64) / D))
    ang = torch.cat([pos[:, None] * inv] * 2, -1)
    return ang.cos().expand(B, T, D), ang.sin().expand(B, T, D)


def decode(layer, cache, x, steps, mask=None):
    out = []
    with torch.no_grad():
        layer(
            x[:, :5], past_key_values=cache, position_embeddings=rope(x.shape[0], 5, 0), attention_mask=mask
        )
        for t in range(5, 5 + steps):
            m = None if mask is None else torch.ones(x.shape[0], t + 1, dtype=torch.long)
            if m is not None:
                m[:, :5] = mask
            out.append(
                layer(x[:, t : t + 1], past_key_values=cache, position_embeddings=rope(x.shape[0], 1, t), attention_mask=m)[0]
            )  # fmt: skip
    return torch.cat(out, 1), cache.get_recurrent_state(0)


@pytest.mark.parametrize("cls, options", LAYERS)
@pytest.mark.parametrize("cache_kind", ["dynamic", "static"])
@pytest.mark.parametrize("padded", [False, True])
def test_a_layer_on_the_fused_path_decodes_as_unfused(monkeypatch, cls, options, cache_kind, padded):
    torch.manual_seed(0)
    layer = cls(CONFIG, 0, **options).double().eval()
    with torch.no_grad():
        for name, p in layer.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    x = torch.randn(2, 9, 32, dtype=torch.float64)
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]]) if padded else None

    def new_cache():
        return DynamicCache() if cache_kind == "dynamic" else StaticCache(config=CONFIG, max_cache_len=16)

    want, want_state = decode(layer, new_cache(), x, 4, mask)
    # off CUDA the fused step runs its torch twin; forced on here to check the layer's wiring of it
    monkeypatch.setattr(swaa.kernels, "fused_step_available", lambda t: True)
    calls = []
    real = swaa.kernels.fused_decode_step
    monkeypatch.setattr(swaa.kernels, "fused_decode_step", lambda *a, **k: calls.append(1) or real(*a, **k))
    got, got_state = decode(layer, new_cache(), x, 4, mask)
    assert len(calls) == 4
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(got_state, want_state, rtol=1e-10, atol=1e-12)


def test_the_fused_path_is_not_taken_where_it_would_compute_something_else(monkeypatch):
    monkeypatch.setattr(swaa.kernels, "fused_step_available", lambda t: True)
    calls = []
    monkeypatch.setattr(swaa.kernels, "fused_decode_step", lambda *a, **k: calls.append(1))
    x = torch.randn(1, 6, 32, dtype=torch.float64)
    for layer in (
        GatedLinearAttention(CONFIG, 0, gate="from_keys").double(),
        LinearAttention(CONFIG, 0).double(),  # softmax features, normalised
        GatedLinearAttention(CONFIG, 0, backend="torch").double(),
    ):
        cache = DynamicCache()
        with torch.no_grad():
            layer(x[:, :5], past_key_values=cache, position_embeddings=rope(1, 5, 0))
            layer(x[:, 5:], past_key_values=cache, position_embeddings=rope(1, 1, 5))
    layer = GatedLinearAttention(CONFIG, 0).double()
    cache = DynamicCache()
    layer(x[:, :5], past_key_values=cache, position_embeddings=rope(1, 5, 0))
    layer(x[:, 5:], past_key_values=cache, position_embeddings=rope(1, 1, 5))  # gradients wanted
    assert calls == []


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(2, 16, 8, 128, 128), (3, 6, 3, 60, 40), (1, 4, 4, 64, 64)])
def test_the_triton_kernel_equals_the_twin_on_cuda(dtype, shape):
    from swaa.kernels.fused_step import _fused_decode_triton

    B, H, Hk, D, V = shape
    x = {k: v.cuda() for k, v in raw_inputs(B, H, Hk, D, V, dtype=torch.float32).items()}
    state = x.pop("state")
    x = {k: v.to(dtype) for k, v in x.items()}
    keep = torch.tensor([True, False, True][:B], device="cuda")
    o1, S1 = fused_decode_step_torch(**x, state=state.clone(), scale=0.2, gate_normalizer=8.0, keep=keep)
    buffer = state.clone()
    o2, S2 = _fused_decode_triton(
        x["q"], x["k"], x["v"], x["gate_logits"], buffer, 0.2, 8.0, x["q_norm_weight"], x["k_norm_weight"],
        1e-6, x["cos"], x["sin"], keep, None,
    )  # fmt: skip
    assert S2.data_ptr() == buffer.data_ptr()
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(o2.float(), o1.float(), rtol=tol, atol=tol)
    torch.testing.assert_close(S2, S1, rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("cls, options", LAYERS)
@pytest.mark.parametrize("cache_kind", ["dynamic", "static"])
def test_the_fused_cuda_decode_equals_the_torch_backend(cls, options, cache_kind):
    torch.manual_seed(0)
    layer = cls(CONFIG, 0, **options).cuda().eval()
    x = torch.randn(2, 9, 32, device="cuda")

    def run(backend):
        layer.backend = backend
        cache = DynamicCache() if cache_kind == "dynamic" else StaticCache(config=CONFIG, max_cache_len=16)
        out = []
        with torch.no_grad():
            layer(
                x[:, :5],
                past_key_values=cache,
                position_embeddings=tuple(t.cuda().float() for t in rope(2, 5, 0)),
            )
            for t in range(5, 9):
                pe = tuple(p.cuda().float() for p in rope(2, 1, t))
                out.append(layer(x[:, t : t + 1], past_key_values=cache, position_embeddings=pe)[0])
        return torch.cat(out, 1), cache.get_recurrent_state(0)

    fused, fused_state = run("auto")
    plain, plain_state = run("torch")
    torch.testing.assert_close(fused, plain, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(fused_state, plain_state, rtol=1e-4, atol=1e-4)
