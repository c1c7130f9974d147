"""LinearAttention and GatedLinearAttention on their own: construction from the configs of the families
they replace, options, padding, cache round trips, gradients, compile and dtypes (CPU, torch kernels)."""

import copy

import pytest
import torch
from transformers import DynamicCache
from transformers.models.llama.modeling_llama import LlamaAttention
from transformers.models.mistral.modeling_mistral import MistralAttention
from transformers.models.qwen2.modeling_qwen2 import Qwen2Attention
from transformers.models.qwen3.modeling_qwen3 import Qwen3Attention

import swaa
from swaa.layers import FEATURE_MAPS, GatedLinearAttention, LinearAttention
from swaa.layers.host_inputs import tokens_to_keep

# the tiny shape of tests/conftest.py (its tiny_config) as the layers' own keywords
KW = dict(hidden_size=32, num_heads=4, num_kv_heads=2, head_dim=8)

# every option a user can turn on, per layer kind; id'd so a failure names the combination
VARIANTS = [
    pytest.param(LinearAttention, {}, id="linear-default"),
    pytest.param(LinearAttention, dict(feature_map="elu", normalize=False), id="linear-elu-unnorm"),
    pytest.param(LinearAttention, dict(feature_map="relu", output_norm=True), id="linear-relu-onorm"),
    pytest.param(
        LinearAttention, dict(feature_map="identity", normalize=False, use_rope=False), id="linear-identity"
    ),
    pytest.param(LinearAttention, dict(feature_map="hedgehog", output_gate=True), id="linear-hedgehog-ogate"),
    pytest.param(GatedLinearAttention, {}, id="gla-default"),
    pytest.param(GatedLinearAttention, dict(gate="from_keys", output_norm=False), id="gla-fromkeys"),
    pytest.param(
        GatedLinearAttention, dict(feature_map="hedgehog", output_gate=True), id="gla-hedgehog-ogate"
    ),
    pytest.param(GatedLinearAttention, dict(feature_map="elu", gate_low_rank_dim=4), id="gla-elu-r4"),
]


def make(cls, dtype=torch.float64, seed=0, **opts):
    torch.manual_seed(seed)
    layer = cls(layer_idx=0, **{**KW, **opts}).to(dtype)
    # random, non-trivial values for everything that starts at a constant (norm weights, hedgehog
    # identity), so the tests see every parameter act
    with torch.no_grad():
        for name, p in layer.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
            elif "feature_map" in name:
                p.add_(0.1 * torch.randn_like(p))
    return layer


def rope(B, T, D=8, start=0, dtype=torch.float64):
    pos = torch.arange(start, start + T, dtype=torch.float64)
    inv = 1.0 / (10000 ** (torch.arange(0, D, 2, dtype=torch.float64) / D))
    ang = torch.cat([pos[:, None] * inv] * 2, -1)
    return ang.cos().to(dtype).expand(B, T, D), ang.sin().to(dtype).expand(B, T, D)


def state_close(a, b, **tol):
    if isinstance(a, tuple):
        assert isinstance(b, tuple) and len(a) == len(b)
        for x, y in zip(a, b):
            torch.testing.assert_close(x, y, **tol)
    else:
        torch.testing.assert_close(a, b, **tol)


# ---------------------------------------------------------------------------------------------------
# construction: same names, shapes and biases as the attention being replaced


@pytest.mark.parametrize(
    "family, attn_cls, extra",
    [
        ("qwen3", Qwen3Attention, {}),
        ("qwen3", Qwen3Attention, dict(attention_bias=True)),
        ("qwen2", Qwen2Attention, {}),
        ("llama", LlamaAttention, dict(attention_bias=True)),
        ("llama", LlamaAttention, {}),
        ("mistral", MistralAttention, {}),
    ],
    ids=["qwen3", "qwen3-bias", "qwen2", "llama-bias", "llama", "mistral"],
)
@pytest.mark.parametrize("cls", [LinearAttention, GatedLinearAttention])
def test_state_dict_of_source_attention_loads_key_for_key(family, attn_cls, extra, cls, tiny_config):
    config = tiny_config(family, **extra)
    config._attn_implementation = "sdpa"
    source = attn_cls(config, 1)
    layer = cls(config, 1)
    result = layer.load_state_dict(source.state_dict(), strict=False)
    assert result.unexpected_keys == []
    # only the layer's own new parameters are left for their documented initialisation
    assert all(
        k.startswith(("gk_proj", "o_norm", "g_proj", "q_feature_map", "k_feature_map"))
        for k in result.missing_keys
    )
    for name, tensor in source.state_dict().items():
        assert torch.equal(layer.state_dict()[name], tensor), name
    assert layer.layer_idx == 1


def test_keywords_replace_the_config_and_override_it(tiny_config):
    layer = GatedLinearAttention(hidden_size=64, num_heads=4, layer_idx=3)
    assert (layer.num_heads, layer.num_kv_heads, layer.head_dim, layer.layer_idx) == (4, 4, 16, 3)
    assert layer.q_proj.bias is None and not hasattr(layer, "q_norm")
    config = tiny_config("qwen3")
    layer = LinearAttention(config, 0, num_kv_heads=4, qk_norm=False, attention_bias=True)
    assert layer.k_proj.out_features == 32 and not hasattr(layer, "q_norm") and layer.o_proj.bias is not None
    # Llama-style configs without head_dim fall back to hidden / heads
    assert (
        LinearAttention(
            tiny_config(
                "mistral", hidden_size=48, num_attention_heads=3, num_key_value_heads=1, head_dim=None
            )
        ).head_dim
        == 16
    )


def test_exported_from_swaa():
    assert swaa.LinearAttention is LinearAttention and swaa.GatedLinearAttention is GatedLinearAttention


@pytest.mark.parametrize(
    "kwargs, err, words",
    [
        (dict(num_heads=4), ValueError, ["hidden_size"]),
        (dict(**KW, backend="cuda"), ValueError, ["backend", "'cuda'"]),
        (dict(**KW, feature_map="tanh"), ValueError, ["feature_map", "'tanh'"]),
        (dict(**KW, gate="scalar"), ValueError, ["gate", "'scalar'"]),
        (dict(**KW, gate_low_rank_dim=0), ValueError, ["gate_low_rank_dim", "0"]),
        (dict(**KW, colour="red"), TypeError, ["colour"]),
        (dict(hidden_size=32, num_heads=4, num_kv_heads=3), ValueError, ["num_kv_heads", "3"]),
        (dict(hidden_size=30, num_heads=4), ValueError, ["head_dim", "30"]),
        (dict(**KW, layer_idx=-1), ValueError, ["layer_idx", "-1"]),
        (dict(**KW, layer_idx="1"), TypeError, ["layer_idx", "str", "'1'"]),
        (dict(hidden_size=32.0, num_heads=4), TypeError, ["hidden_size", "float"]),
        # a flag spelled as text (JSON config, `swaa --option`) would be truthy even when it says False
        (dict(**KW, output_norm="False"), TypeError, ["output_norm", "bool", "'False'"]),
        (dict(**KW, use_rope=1), TypeError, ["use_rope", "bool", "int"]),
        (dict(**KW, scale="x"), TypeError, ["scale", "'x'"]),
        (dict(**KW, scale=-1.0), ValueError, ["scale", "-1.0"]),
        (dict(**KW, norm_eps=0), ValueError, ["norm_eps", "0"]),
        (dict(**KW, gate_logit_normalizer=True), TypeError, ["gate_logit_normalizer", "bool"]),
    ],
)
def test_bad_arguments_are_refused_with_their_name(kwargs, err, words):
    with pytest.raises(err) as info:
        GatedLinearAttention(**kwargs)
    for word in words:
        assert word in str(info.value)


def test_forward_refuses_wrong_inputs_and_a_cache_without_layer_idx():
    layer = LinearAttention(**KW)
    with pytest.raises(ValueError, match="hidden_states must be"):
        layer(torch.randn(2, 5, 16))
    with pytest.raises(ValueError, match="layer_idx"):
        layer(torch.randn(2, 5, 32), past_key_values=DynamicCache())
    with pytest.raises(ValueError, match="attention_mask"):
        layer(torch.randn(2, 5, 32), attention_mask=torch.ones(2, 1, 4, 5, dtype=torch.bool))


# ---------------------------------------------------------------------------------------------------
# feature maps and gates


@pytest.mark.parametrize("name", FEATURE_MAPS)
def test_feature_maps(name):
    layer = LinearAttention(**KW, feature_map=name)
    x = torch.randn(2, 3, 4, 8)
    y = layer.q_feature_map(x)
    assert y.shape == ((2, 3, 4, 16) if name == "hedgehog" else x.shape)
    if name in ("elu", "softmax", "hedgehog"):
        assert (y > 0).all()
    if name == "softmax":
        torch.testing.assert_close(y.sum(-1), torch.ones(2, 3, 4))
    if name == "hedgehog":
        # identity start: the two-sided softmax map, learnable
        torch.testing.assert_close(y, torch.cat([x.softmax(-1), (-x).softmax(-1)], -1))
        assert layer.q_feature_map.weight.requires_grad


def test_low_rank_gate_starts_with_long_and_short_memories():
    layer = GatedLinearAttention(**KW)
    x = torch.randn(2, 6, 32)
    k = layer.k_proj(x).view(2, 6, 2, 8)
    g = layer._gate(x, k)
    assert g.shape == (2, 6, 2, 8) and (g <= 0).all()
    decay = g.exp().mean((0, 1, 2))
    # time constants 10 .. 1000 tokens across the key dims (small input-dependent spread)
    assert 0.85 < decay.min() < 0.95 and 0.995 < decay.max() <= 1.0


def test_from_keys_gate_adds_no_parameters():
    plain = LinearAttention(**KW, feature_map="identity", normalize=False, output_norm=True)
    gla = GatedLinearAttention(**KW, gate="from_keys")
    assert sorted(n for n, _ in gla.named_parameters()) == sorted(n for n, _ in plain.named_parameters())


def test_reset_parameters_restores_the_documented_init():
    layer = GatedLinearAttention(**KW, feature_map="hedgehog", output_gate=True)
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(1.0)
    layer.reset_parameters()
    after = layer.state_dict()
    for name in ("gk_proj.1.bias", "o_norm.weight", "q_feature_map.weight", "k_feature_map.weight"):
        assert torch.equal(after[name], before[name]), name
    # copied projections are left alone
    assert torch.equal(after["q_proj.weight"], before["q_proj.weight"] + 1)


# ---------------------------------------------------------------------------------------------------
# padding masks as they reach an attention module


def test_tokens_to_keep_reads_every_mask_form():
    keep = torch.tensor([[False, False, True, True], [True, True, True, True]])
    # 2D padding mask, also one that covers past tokens
    assert torch.equal(tokens_to_keep(keep.long(), 4, 0), keep)
    assert torch.equal(
        tokens_to_keep(torch.cat([torch.ones(2, 3, dtype=torch.long), keep.long()], 1), 4, 3), keep
    )
    # 4D bool (SDPA) and additive float (eager) masks: the diagonal of the new queries
    causal = torch.ones(4, 7, dtype=torch.bool).tril(3)
    pad = torch.cat([torch.ones(2, 3, dtype=torch.bool), keep], 1)
    bool_mask = (causal[None] & pad[:, None, :])[:, None]
    assert torch.equal(tokens_to_keep(bool_mask, 4, 3), keep)
    assert torch.equal(tokens_to_keep(bool_mask, 4, torch.tensor(3)), keep)
    float_mask = torch.zeros(bool_mask.shape).masked_fill(~bool_mask, torch.finfo(torch.float32).min)
    assert torch.equal(tokens_to_keep(float_mask, 4, 3), keep)
    # a static cache's mask is wider than past + new: the offset says where the new tokens are
    wide = torch.cat([bool_mask, torch.zeros(2, 1, 4, 5, dtype=torch.bool)], -1)
    assert torch.equal(tokens_to_keep(wide, 4, 3), keep)
    assert tokens_to_keep(None, 4, 0) is None
    with pytest.raises(TypeError, match="attention_mask"):
        tokens_to_keep([[1, 1]], 2, 0)


@pytest.mark.parametrize("cls, opts", VARIANTS)
def test_left_padded_rows_equal_each_sequence_alone(cls, opts):
    layer = make(cls, **opts)
    lengths = [7, 4, 1]
    T = max(lengths)
    torch.manual_seed(1)
    x = torch.randn(len(lengths), T, 32, dtype=torch.float64)
    mask = torch.zeros(len(lengths), T, dtype=torch.long)
    for b, n in enumerate(lengths):
        mask[b, T - n :] = 1
    # garbage at padding (as a model's padded positions may carry) must not leak into the state
    x = x.masked_fill(mask[..., None] == 0, float("nan"))
    cos, sin = rope(len(lengths), T)
    # each row's positions start at its first real token, as generate() computes them
    pos = (mask.cumsum(1) - 1).clamp(min=0)
    cos, sin = cos[0][pos], sin[0][pos]
    cache = DynamicCache()
    out, _ = layer(x, attention_mask=mask, past_key_values=cache, position_embeddings=(cos, sin))
    for b, n in enumerate(lengths):
        alone_cache = DynamicCache()
        alone, _ = layer(x[b : b + 1, T - n :], past_key_values=alone_cache, position_embeddings=rope(1, n))
        torch.testing.assert_close(out[b : b + 1, T - n :], alone, rtol=1e-10, atol=1e-10)
        padded_state = cache.get_recurrent_state(0)
        row = (
            tuple(s[b : b + 1] for s in padded_state)
            if isinstance(padded_state, tuple)
            else padded_state[b : b + 1]
        )
        state_close(row, alone_cache.get_recurrent_state(0), rtol=1e-10, atol=1e-10)


# ---------------------------------------------------------------------------------------------------
# the state in the cache


@pytest.mark.parametrize("cls, opts", VARIANTS)
def test_chunked_prefill_and_decode_equal_one_forward(cls, opts):
    layer = make(cls, **opts)
    torch.manual_seed(2)
    B, T = 2, 11
    x = torch.randn(B, T, 32, dtype=torch.float64)
    full, none = layer(x, position_embeddings=rope(B, T))
    assert none is None and full.shape == (B, T, 32)
    cache = DynamicCache()
    pieces, start = [], 0
    for n in (4, 3, 1, 1, 2):
        out, _ = layer(
            x[:, start : start + n], past_key_values=cache, position_embeddings=rope(B, n, start=start)
        )
        pieces.append(out)
        start += n
        assert cache.get_seq_length(0) == start
    torch.testing.assert_close(torch.cat(pieces, 1), full, rtol=1e-10, atol=1e-10)
    state = cache.get_recurrent_state(0)
    first = state[0] if isinstance(state, tuple) else state
    assert first.dtype == torch.float64 and first.shape[:2] == (B, 4)
    assert isinstance(state, tuple) == (cls is LinearAttention and layer.normalize)


def test_cache_keyword_spellings():
    layer = make(GatedLinearAttention)
    x = torch.randn(1, 3, 32, dtype=torch.float64)
    for name in ("past_key_values", "cache", "past_key_value"):
        cache = DynamicCache()
        layer(x, **{name: cache})
        assert cache.get_recurrent_state(0) is not None and cache.get_seq_length() == 3, name


def test_state_of_another_batch_size_is_refused_and_the_cache_kept():
    layer = make(LinearAttention)
    cache = DynamicCache()
    layer(torch.randn(2, 3, 32, dtype=torch.float64), past_key_values=cache)
    state = cache.get_recurrent_state(0)
    with pytest.raises(ValueError, match="batch size 2"):
        layer(torch.randn(3, 1, 32, dtype=torch.float64), past_key_values=cache)
    with pytest.raises(ValueError, match="attention_mask"):
        layer(
            torch.randn(2, 1, 32, dtype=torch.float64), past_key_values=cache, attention_mask=torch.ones(4, 4)
        )
    # a refused call leaves the cache as it was
    assert cache.get_recurrent_state(0) is state and cache.get_seq_length() == 3


# ---------------------------------------------------------------------------------------------------
# training, compile, dtypes


@pytest.mark.parametrize("cls, opts", VARIANTS)
def test_gradients_reach_every_parameter(cls, opts, tiny_config):
    config = tiny_config("qwen3", attention_bias=True)
    layer = cls(config, 0, **opts)
    x = torch.randn(2, 6, 32, requires_grad=True)
    mask = torch.tensor([[0, 1, 1, 1, 1, 1], [1] * 6])
    out, _ = layer(x, attention_mask=mask, position_embeddings=rope(2, 6, dtype=torch.float32))
    out.square().mean().backward()
    for name, p in layer.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert x.grad.abs().sum() > 0


@pytest.mark.parametrize("cls", [LinearAttention, GatedLinearAttention])
def test_torch_compile_runs_forward_and_backward(cls):
    torch._dynamo.reset()
    layer = make(cls, dtype=torch.float32, backend="torch")
    x = torch.randn(2, 8, 32)
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[0, :3] = 0
    eager, _ = layer(x, attention_mask=mask)
    compiled = torch.compile(layer)
    out, _ = compiled(x, attention_mask=mask)
    out.sum().backward()
    torch.testing.assert_close(out, eager, rtol=1e-4, atol=1e-5)
    assert layer.q_proj.weight.grad is not None


@pytest.mark.parametrize("cls", [LinearAttention, GatedLinearAttention])
def test_bf16_activations_keep_a_float32_state(cls):
    ref = make(cls, dtype=torch.float32)
    layer = make(cls, dtype=torch.bfloat16)
    x = torch.randn(2, 9, 32)
    cache = DynamicCache()
    out, _ = layer(x.bfloat16(), past_key_values=cache, position_embeddings=rope(2, 9, dtype=torch.bfloat16))
    state = cache.get_recurrent_state(0)
    assert out.dtype == torch.bfloat16
    for s in state if isinstance(state, tuple) else (state,):
        assert s.dtype == torch.float32
    # a decode step on top of the float32 state stays in bf16 outside and float32 inside
    step, _ = layer(
        x[:, :1].bfloat16(),
        past_key_values=cache,
        position_embeddings=rope(2, 1, start=9, dtype=torch.bfloat16),
    )
    assert step.dtype == torch.bfloat16
    expected, _ = ref(x, position_embeddings=rope(2, 9, dtype=torch.float32))
    torch.testing.assert_close(out.float(), expected, rtol=5e-2, atol=5e-2)


def _rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("feature_map", ["softmax", "hedgehog"])
def test_bf16_gradients_of_softmax_feature_maps_stay_close_to_float64(feature_map, tiny_config):
    # softmax's backward subtracts nearly equal parts of the features' gradient; when the kernel ran in
    # bf16 and handed that gradient back rounded, the worst gradient here was 2.7e-2 (hedgehog) to 3.7e-2
    # (softmax) off float64; with float32 features ~1.5e-2
    torch.manual_seed(0)
    config = tiny_config("qwen3", hidden_size=256, head_dim=64)
    layer = LinearAttention(config, 0, feature_map=feature_map).bfloat16()
    ref = copy.deepcopy(layer).double()
    x = torch.randn(2, 300, 256).bfloat16()
    grads = []
    for lay, dtype in ((layer, torch.bfloat16), (ref, torch.float64)):
        xi = x.to(dtype).clone().requires_grad_()
        cache = DynamicCache()
        out, _ = lay(xi, past_key_values=cache, position_embeddings=rope(2, 300, D=64, dtype=dtype))
        state = cache.get_recurrent_state(0)
        assert out.dtype == dtype
        for s in state if isinstance(state, tuple) else (state,):
            assert s.dtype == torch.promote_types(dtype, torch.float32)
        (out * torch.linspace(-1, 1, 256, dtype=dtype)).sum().backward()
        grads.append({"x": xi.grad, **{n: p.grad for n, p in lay.named_parameters()}})
    for name, g64 in grads[1].items():
        assert _rel(grads[0][name], g64) < 2e-2, name


@pytest.mark.parametrize("cls", [LinearAttention, GatedLinearAttention])
def test_a_layer_reapplies_the_cache_patch_after_an_unhack(cls):
    # the layer asks swaa.cache whether the patch is in place at every forward with a cache: a model keeps
    # decoding after someone else unhacks, in this thread and in another one
    from swaa.cache import hack_kv_cache_recurrent_state, is_hacked, unhack_kv_cache_recurrent_state

    layer = make(cls)
    x, pos = torch.randn(1, 5, 32, dtype=torch.float64), rope(1, 5)
    was = is_hacked()
    try:
        hack_kv_cache_recurrent_state()
        first, _ = layer(x, past_key_values=DynamicCache(), position_embeddings=pos)
        unhack_kv_cache_recurrent_state()
        again, _ = layer(x, past_key_values=DynamicCache(), position_embeddings=pos)
        assert is_hacked()
        torch.testing.assert_close(again, first, rtol=0, atol=0)

        unhack_kv_cache_recurrent_state()
        results = {}

        def run():
            cache = DynamicCache()
            results["out"] = layer(x, past_key_values=cache, position_embeddings=pos)[0]
            results["tokens"] = cache.get_seq_length(0)

        import threading

        thread = threading.Thread(target=run)
        thread.start()
        thread.join()
        torch.testing.assert_close(results["out"], first, rtol=0, atol=0)
        assert results["tokens"] == 5
    finally:
        if not was:
            unhack_kv_cache_recurrent_state()
        else:
            hack_kv_cache_recurrent_state()
