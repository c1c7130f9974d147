"""The sliding-window + (gated) linear attention layers (kinds ``swa_gla``, ``swa_linear``) on CPU: the
full forward against a float64 listing of the definition, the state in the cache (prefill + decode and
chunked prefill across the window boundary), left padding, packing, beam search, save/load, and the
static-cache decode, plain and compiled (fullgraph, one graph)."""

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend
from transformers import AutoModelForCausalLM, DynamicCache, Qwen3ForCausalLM, StaticCache
from transformers.generation import CompileConfig

import swaa
from swaa.convert import convert_to_hybrid
from swaa.layers import SlidingWindowGatedLinearAttention, SlidingWindowLinearAttention
from swaa.layers.host_inputs import cache_argument
from swaa.layers.modules import apply_rope
from swaa.layers.sliding_window import window_attention

CACHE_ARG = cache_argument(Qwen3ForCausalLM)
# the tiny shape of tests/conftest.py as the layers' own keywords
KW = dict(hidden_size=32, num_heads=4, num_kv_heads=2, head_dim=8)
SWA = SlidingWindowGatedLinearAttention
SWL = SlidingWindowLinearAttention
VARIANTS = [
    pytest.param(SWA, {}, id="swa_gla"),
    pytest.param(SWA, dict(gate="from_keys", feature_map="elu", output_norm=True), id="swa_gla-fromkeys-elu"),
    pytest.param(SWA, dict(feature_map="hedgehog", output_gate=True), id="swa_gla-hedgehog-ogate"),
    pytest.param(SWL, {}, id="swa_linear"),
    pytest.param(SWL, dict(feature_map="relu", scale=0.2), id="swa_linear-relu-scale"),
    pytest.param(SWL, dict(feature_map="hedgehog", output_norm=True), id="swa_linear-hedgehog-onorm"),
]


def make(cls, window, dtype=torch.float64, seed=0, **opts):
    torch.manual_seed(seed)
    layer = cls(layer_idx=0, window=window, **{**KW, **opts}).to(dtype)
    # random values for what starts at a constant, so every parameter acts
    with torch.no_grad():
        for name, p in layer.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
            elif "feature_map" in name:
                p.add_(0.1 * torch.randn_like(p))
            elif name.startswith("gk_proj.1.bias"):
                p.sub_(2.0)  # shorter memories than the init: the decay must show in the tests
    return layer


def rope(B, T, D=8, start=0, dtype=torch.float64):
    pos = torch.arange(start, start + T, dtype=torch.float64)
    inv = 1.0 / (10000 ** (torch.arange(0, D, 2, dtype=torch.float64) / D))
    ang = torch.cat([pos[:, None] * inv] * 2, -1)
    return ang.cos().to(dtype).expand(B, T, D), ang.sin().to(dtype).expand(B, T, D)


def reference(layer, x, cos, sin, keep):
    """The definition (swaa/layers/sliding_window.py) applied directly, token by token, in float64, to
    each row's real tokens alone: softmax over the window w(t) = the last W real tokens, linear scores
    phi(q_t) . (decay * phi(k_s)) over the real tokens before it (decay: the gates of the tokens before
    the window that came after s), one denominator 1 + sum of the linear scores."""
    W = layer.window
    q, k, v = layer._heads(x)
    g = layer._gate(x, k) if isinstance(layer, SWA) else None
    q, k = apply_rope(q, k, cos, sin)
    fq, fk = layer.q_feature_map(q), layer.k_feature_map(k)
    k, v, fk = (t.repeat_interleave(layer.num_kv_groups, 2) for t in (k, v, fk))
    g = None if g is None else g.repeat_interleave(layer.num_kv_groups, 2)
    scale = layer.head_dim**-0.5 if layer.scale is None else layer.scale
    B, T, H, D = q.shape
    out = torch.zeros(B, T, H, D, dtype=torch.float64)
    for b in range(B):
        real = [t for t in range(T) if keep[b, t]]
        for i, t in enumerate(real):
            win, far = real[max(0, i - W + 1) : i + 1], real[: max(0, i - W + 1)]
            p = (torch.einsum("hd,shd->hs", q[b, t], k[b, win]) * scale).softmax(-1)
            num = torch.einsum("hs,shd->hd", p, v[b, win])
            den = torch.ones(H, 1, dtype=torch.float64)
            for j, s in enumerate(far):
                decay = 1.0 if g is None else g[b, far[j + 1 :]].sum(0).exp()
                w = (fq[b, t] * decay * fk[b, s]).sum(-1, keepdim=True)
                num, den = num + w * v[b, s], den + w
            out[b, t] = num / den
    gate = layer.g_proj(x).view(B, T, H, D) if layer.output_gate else None
    return layer.o_proj(layer._output_norm_and_gate(out, gate).reshape(B, T, H * D))


# ---------------------------------------------------------------------------------------------------
# the layer against the definition


@pytest.mark.parametrize("window", [1, 3, 20], ids=["W1", "W3", "W-over-T"])
@pytest.mark.parametrize("cls, opts", VARIANTS)
def test_forward_equals_the_definition_with_left_padding(cls, opts, window):
    layer = make(cls, window, **opts)
    lengths = [11, 7, 2]
    B, T = len(lengths), max(lengths)
    torch.manual_seed(1)
    x = torch.randn(B, T, 32, dtype=torch.float64)
    mask = torch.zeros(B, T, dtype=torch.long)
    for b, n in enumerate(lengths):
        mask[b, T - n :] = 1
    # garbage at padding must not leak
    x = x.masked_fill(mask[..., None] == 0, float("nan"))
    cos, sin = rope(B, T)
    pos = (mask.cumsum(1) - 1).clamp(min=0)
    cos, sin = cos[0][pos], sin[0][pos]
    with torch.no_grad():
        out, none = layer(x, attention_mask=mask, position_embeddings=(cos, sin))
        want = reference(layer, x, cos, sin, mask.bool())
    assert none is None
    real = mask.bool()
    torch.testing.assert_close(out[real], want[real], rtol=1e-10, atol=1e-12)


def test_a_window_longer_than_the_text_is_the_softmax_attention_it_replaces(tiny_model, tiny_ids):
    # within the first W tokens the linear part is empty: a converted model is the original exactly
    for family in ("qwen3", "llama"):
        model = tiny_model(family, dtype=torch.float64)
        ids = tiny_ids(2, 12)
        with torch.no_grad():
            want = model(ids).logits
            for kind in ("swa_gla", "swa_linear"):
                hybrid = convert_to_hybrid(
                    tiny_model(family, dtype=torch.float64), "all", kind=kind, window=12
                )
                # (transformers' RMSNorm and RoPE tables run in float32 even for float64 models: ~4e-8)
                torch.testing.assert_close(hybrid(ids).logits, want, rtol=1e-6, atol=1e-6)
                # one token more and the first one is linear: the logits move
                short = convert_to_hybrid(
                    tiny_model(family, dtype=torch.float64), "all", kind=kind, window=11
                )
                assert not torch.allclose(short(ids).logits[:, -1], want[:, -1], rtol=1e-3, atol=1e-3)


def test_window_attention_blocks_equal_a_banded_softmax():
    torch.manual_seed(0)
    B, T, H, D, W = 2, 150, 3, 4, 5  # T over the block size, not a multiple of it
    q = torch.randn(B, T, H, D, dtype=torch.float64)
    xk, xv = torch.randn(2, B, W + T, H, D, dtype=torch.float64)
    ok = torch.rand(B, W + T) > 0.3
    ok[:, W:] = True
    ok[0, W + 40 : W + 60] = False  # invalid slots among the keys
    o = window_attention(q, xk, xv, ok, W, 0.7)
    t = torch.arange(T)[:, None]
    j = torch.arange(W + T)[None]
    band = (j > t) & (j <= t + W) & ok[:, None]
    band = band | (j == t + W)
    scores = torch.einsum("bthd,bjhd->bhtj", q, xk) * 0.7
    p = scores.masked_fill(~band[:, None], float("-inf")).softmax(-1)
    torch.testing.assert_close(o, torch.einsum("bhtj,bjhd->bthd", p, xv), rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------------------------------------------
# the state in the cache


@pytest.mark.parametrize("window", [1, 3, 6])
@pytest.mark.parametrize("cls, opts", VARIANTS[::3] + VARIANTS[2:3])
def test_chunked_prefill_and_decode_across_the_window_equal_one_forward(cls, opts, window):
    layer = make(cls, window, **opts)
    torch.manual_seed(2)
    B, T = 2, 13
    x = torch.randn(B, T, 32, dtype=torch.float64)
    with torch.no_grad():
        full, _ = layer(x, position_embeddings=rope(B, T))
        for chunks in ((4, 3, 1, 1, 2, 2), (1,) * T, (T - 1, 1)):
            cache = DynamicCache()
            pieces, start = [], 0
            for n in chunks:
                out, _ = layer(
                    x[:, start : start + n],
                    past_key_values=cache,
                    position_embeddings=rope(B, n, start=start),
                )
                pieces.append(out)
                start += n
                assert cache.get_seq_length(0) == start
            torch.testing.assert_close(torch.cat(pieces, 1), full, rtol=1e-10, atol=1e-10)
    state = cache.get_recurrent_state(0)
    gated = cls is SWA
    assert isinstance(state, tuple) and len(state) == (5 if gated else 4)
    S, wk, wv, ok = state[0], state[1], state[2], state[-1]
    K = 16 if opts.get("feature_map") == "hedgehog" else 8
    assert S.shape == (B, 4, K, 9) and S.dtype == torch.float64
    assert wk.shape == wv.shape == (B, window, 2, 8) and ok.shape == (B, window) and ok.all()
    if gated:
        assert state[3].shape == (B, window, 2, K)


def test_the_window_fills_slot_by_slot_and_padding_stays_invalid():
    layer = make(SWA, 4)
    x = torch.randn(2, 3, 32, dtype=torch.float64)
    cache = DynamicCache()
    with torch.no_grad():
        layer(x, attention_mask=torch.tensor([[0, 1, 1], [1, 1, 1]]), past_key_values=cache)
    ok = cache.get_recurrent_state(0)[-1]
    assert ok.tolist() == [[False, False, True, True], [False, True, True, True]]
    assert not cache.get_recurrent_state(0)[0].any()  # nothing has left the window yet


@pytest.mark.parametrize("cls", [SWA, SWL])
def test_left_padded_cache_rows_equal_each_sequence_alone(cls):
    layer = make(cls, 3)
    lengths = [8, 4, 1]
    B, T = len(lengths), max(lengths)
    torch.manual_seed(3)
    x = torch.randn(B, T + 3, 32, dtype=torch.float64)
    mask = torch.ones(B, T + 3, dtype=torch.long)
    for b, n in enumerate(lengths):
        mask[b, : T - n] = 0
    cos, sin = rope(B, T + 3)
    pos = (mask.cumsum(1) - 1).clamp(min=0)
    cos, sin = cos[0][pos], sin[0][pos]
    with torch.no_grad():
        cache = DynamicCache()
        outs = [
            layer(
                x[:, :T],
                attention_mask=mask[:, :T],
                past_key_values=cache,
                position_embeddings=(cos[:, :T], sin[:, :T]),
            )[0]
        ]
        for t in range(T, T + 3):  # decode steps: the 2D mask covers the past and the new token
            outs.append(
                layer(
                    x[:, t : t + 1],
                    attention_mask=mask[:, : t + 1],
                    past_key_values=cache,
                    position_embeddings=(cos[:, t : t + 1], sin[:, t : t + 1]),
                )[0]
            )
        out = torch.cat(outs, 1)
        for b, n in enumerate(lengths):
            alone_cache = DynamicCache()
            alone = layer(
                x[b : b + 1, T - n : T], past_key_values=alone_cache, position_embeddings=rope(1, n)
            )[0]
            steps = [
                layer(
                    x[b : b + 1, t : t + 1],
                    past_key_values=alone_cache,
                    position_embeddings=rope(1, 1, start=n + i),
                )[0]
                for i, t in enumerate(range(T, T + 3))
            ]
            torch.testing.assert_close(
                out[b : b + 1, T - n :], torch.cat([alone, *steps], 1), rtol=1e-10, atol=1e-10
            )
            padded, single = cache.get_recurrent_state(0), alone_cache.get_recurrent_state(0)
            torch.testing.assert_close(padded[0][b : b + 1], single[0], rtol=1e-10, atol=1e-10)
            # the window holds the same real tokens (a short row's empty slots are invalid in both)
            assert torch.equal(padded[-1][b : b + 1], single[-1])


def test_a_state_of_another_layout_is_refused_and_the_cache_kept():
    layer = make(SWA, 3)
    cache = DynamicCache()
    with torch.no_grad():
        make(SWA, 5)(torch.randn(2, 4, 32, dtype=torch.float64), past_key_values=cache)
        state = cache.get_recurrent_state(0)
        with pytest.raises(ValueError, match="W=3"):
            layer(torch.randn(2, 1, 32, dtype=torch.float64), past_key_values=cache)
        with pytest.raises(ValueError, match="tuple of 5"):
            make(SWL, 5)(torch.randn(2, 1, 32, dtype=torch.float64), past_key_values=cache)
    assert cache.get_recurrent_state(0) is state and cache.get_seq_length() == 4


# ---------------------------------------------------------------------------------------------------
# options, parameters, dtypes


@pytest.mark.parametrize(
    "cls, kwargs, err, words",
    [
        (SWA, dict(window=0), ValueError, ["window", "0"]),
        (SWL, dict(window="64"), TypeError, ["window", "str"]),
        (SWA, dict(window=True), TypeError, ["window", "bool"]),
        (SWA, dict(feature_map="identity"), ValueError, ["feature_map", "'identity'", "non-negative"]),
        (SWL, dict(normalize=True), TypeError, ["normalize"]),
        (SWA, dict(gate="scalar"), ValueError, ["gate", "'scalar'"]),
    ],
)
def test_bad_options_are_refused_with_their_name(cls, kwargs, err, words):
    with pytest.raises(err) as info:
        cls(**KW, **kwargs)
    for word in words:
        assert word in str(info.value)


def test_defaults_options_and_exports():
    layer = SWA(**KW)
    assert layer.window == 64 and layer.feature_map == "softmax" and not layer.output_norm
    assert layer.options["window"] == 64 and "normalize" not in SWL(**KW).options
    assert "window=64" in repr(layer)
    assert swaa.convert.KINDS["swa_gla"] == "SlidingWindowGatedLinearAttention"
    assert swaa.convert.KINDS["swa_linear"] == "SlidingWindowLinearAttention"
    # no parameters beyond the (gated) linear attention's: the window reuses q/k/v/o
    plain = swaa.layers.GatedLinearAttention(**KW, feature_map="softmax", output_norm=False)
    assert sorted(n for n, _ in layer.named_parameters()) == sorted(n for n, _ in plain.named_parameters())


@pytest.mark.parametrize("cls", [SWA, SWL])
def test_gradients_reach_every_parameter(cls, tiny_config):
    layer = cls(
        tiny_config("qwen3", attention_bias=True), 0, window=2, feature_map="hedgehog", output_gate=True
    )
    x = torch.randn(2, 6, 32, requires_grad=True)
    mask = torch.tensor([[0, 1, 1, 1, 1, 1], [1] * 6])
    out, _ = layer(x, attention_mask=mask, position_embeddings=rope(2, 6, dtype=torch.float32))
    out.square().mean().backward()
    for name, p in layer.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_bf16_activations_keep_a_float32_state():
    layer = make(SWA, 3, dtype=torch.bfloat16)
    ref = make(SWA, 3, dtype=torch.float32)
    x = torch.randn(2, 9, 32)
    cache = DynamicCache()
    with torch.no_grad():
        out, _ = layer(
            x.bfloat16(), past_key_values=cache, position_embeddings=rope(2, 9, dtype=torch.bfloat16)
        )
        S, wk = cache.get_recurrent_state(0)[:2]
        assert out.dtype == torch.bfloat16 and S.dtype == torch.float32 and wk.dtype == torch.bfloat16
        step, _ = layer(
            x[:, :1].bfloat16(),
            past_key_values=cache,
            position_embeddings=rope(2, 1, start=9, dtype=torch.bfloat16),
        )
        assert step.dtype == torch.bfloat16 and torch.isfinite(step).all()
        expected, _ = ref(x, position_embeddings=rope(2, 9, dtype=torch.float32))
    torch.testing.assert_close(out.float(), expected, rtol=5e-2, atol=5e-2)


# ---------------------------------------------------------------------------------------------------
# inside models (converted with convert_to_hybrid)


@pytest.fixture
def hybrid(tiny_model):
    def build(
        family="qwen3", kind="swa_gla", layers=(0, 2), window=3, attn="sdpa", dtype=torch.float64, **opts
    ):
        extra = dict(attention_bias=True) if family == "llama" else {}
        model = tiny_model(family, num_hidden_layers=3, attn_implementation=attn, **extra)
        convert_to_hybrid(model, list(layers), kind=kind, window=window, **opts)
        model.generation_config.eos_token_id = None
        return model.to(dtype).eval()

    return build


def call(model, ids, cache=None, **kwargs):
    if cache is not None:
        kwargs[CACHE_ARG] = cache
        kwargs["use_cache"] = True
    return model(ids, **kwargs)


MODELS = [
    pytest.param("qwen3", "swa_gla", id="qwen3-swa_gla"),
    pytest.param("qwen3", "swa_linear", id="qwen3-swa_linear"),
    pytest.param("llama", "swa_gla", id="llama-swa_gla"),
    pytest.param("llama", "swa_linear", id="llama-swa_linear"),
]


@pytest.mark.parametrize("family, kind", MODELS)
def test_model_prefill_decode_and_chunked_prefill_equal_one_forward(family, kind, hybrid, tiny_ids):
    # layer 0 converted: the cache's length comes from a state-only layer
    model = hybrid(family, kind, layers=(0, 1, 2))
    ids = tiny_ids(2, 10)
    with torch.no_grad():
        full = model(ids).logits
        for chunks in ((2, 1, 1, 1, 1, 1, 1, 1, 1), (3, 4, 3), (5, 5)):
            cache = DynamicCache()
            logits, start = [], 0
            for n in chunks:
                logits.append(call(model, ids[:, start : start + n], cache).logits)
                start += n
                assert cache.get_seq_length() == start
            torch.testing.assert_close(torch.cat(logits, 1), full, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("family, kind", MODELS[:2])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_model_left_padded_batch_equals_each_sequence_alone(
    family, kind, attn, hybrid, tiny_ids, softmax_tolerance
):
    model = hybrid(family, kind, attn=attn)
    lengths = [8, 5, 2]
    B, T = len(lengths), max(lengths)
    seqs = [tiny_ids(1, n, seed=10 + n) for n in lengths]
    ids = torch.zeros(B, T, dtype=torch.long)
    mask = torch.zeros(B, T, dtype=torch.long)
    for b, (s, n) in enumerate(zip(seqs, lengths)):
        ids[b, T - n :], mask[b, T - n :] = s[0], 1
    nxt = tiny_ids(B, 4, seed=3)
    pos = (mask.cumsum(1) - 1).clamp(min=0)
    with torch.no_grad():
        cache = DynamicCache()
        out = [call(model, ids, cache, attention_mask=mask, position_ids=pos).logits]
        for i in range(4):  # decode steps past the window boundary
            mask = torch.cat([mask, torch.ones(B, 1, dtype=torch.long)], 1)
            out.append(
                call(
                    model, nxt[:, i : i + 1], cache, attention_mask=mask, position_ids=pos[:, -1:] + 1 + i
                ).logits
            )
        for b, (s, n) in enumerate(zip(seqs, lengths)):
            alone_cache = DynamicCache()
            alone = [call(model, s, alone_cache).logits]
            alone += [call(model, nxt[b : b + 1, i : i + 1], alone_cache).logits for i in range(4)]
            tol = softmax_tolerance(attn)
            torch.testing.assert_close(out[0][b, T - n :], alone[0][0], **tol)
            for i in range(1, 5):
                torch.testing.assert_close(out[i][b], alone[i][0], **tol)


def generate(model, ids, mask, **kwargs):
    return model.generate(ids, attention_mask=mask, max_new_tokens=6, pad_token_id=0, **kwargs)


@pytest.mark.parametrize("family, kind", MODELS[:2] + MODELS[2:3])
def test_generate_greedy_and_beam_with_and_without_cache(family, kind, hybrid, tiny_ids):
    model = hybrid(family, kind)
    ids = tiny_ids(2, 5)
    mask = torch.ones_like(ids)
    ids[1, :2], mask[1, :2] = 0, 0
    for opts in (dict(do_sample=False), dict(do_sample=False, num_beams=3)):
        cached = generate(model, ids, mask, use_cache=True, **opts)
        uncached = generate(model, ids, mask, use_cache=False, **opts)
        assert cached.shape == (2, 11)
        assert torch.equal(cached, uncached), opts


@pytest.mark.parametrize("kind", ["swa_gla", "swa_linear"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_sequences_stay_apart(kind, attn, hybrid, tiny_ids):
    model = hybrid("qwen3", kind, attn=attn)
    lengths = [5, 9, 3]
    seqs = [tiny_ids(1, n, seed=s) for s, n in enumerate(lengths, start=3)]
    packed = torch.cat(seqs, dim=1)
    position_ids = torch.cat([torch.arange(n) for n in lengths])[None]
    with torch.no_grad():
        logits = model(packed, position_ids=position_ids, use_cache=False).logits
        alone = [model(s, use_cache=False).logits for s in seqs]
    # (float32 RoPE tables in transformers: ~3e-8 apart even in float64; a leak is O(0.1))
    torch.testing.assert_close(logits, torch.cat(alone, dim=1), rtol=1e-6, atol=1e-6)


def test_flash_style_cu_seq_lens_equal_each_sequence_alone():
    layer = make(SWA, 3)
    x = torch.randn(1, 14, 32, dtype=torch.float64)
    cu = torch.tensor([0, 2, 9, 14])
    with torch.no_grad():
        out, _ = layer(x, cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=7, max_length_k=7)
        for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
            torch.testing.assert_close(out[:, a:b], layer(x[:, a:b])[0], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("kind, options", [("swa_gla", {}), ("swa_linear", {"feature_map": "elu"})])
def test_save_load_round_trip_through_auto_model(tmp_path, kind, options, tiny_model, tiny_ids):
    model = convert_to_hybrid(tiny_model("qwen3"), "every:2", kind=kind, window=5, **options)
    x = tiny_ids(2, 11)
    with torch.no_grad():
        expected = model(x).logits
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(loaded) is type(model)
    layer = loaded.model.layers[0].self_attn
    assert type(layer).__name__ == swaa.convert.KINDS[kind] and layer.window == 5
    assert loaded.config.swaa_hybrid["options"] == {"window": 5, **options}
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, expected)


# ---------------------------------------------------------------------------------------------------
# static cache: generate, and a compiled decode step


@pytest.mark.parametrize("kind", ["swa_gla", "swa_linear"])
def test_static_cache_generate_gives_the_dynamic_tokens(kind, hybrid, tiny_ids):
    model = hybrid("qwen3", kind, layers=(0, 1), dtype=torch.float32)
    ids = tiny_ids(2, 5)
    mask = torch.ones_like(ids)
    ids[1, :2], mask[1, :2] = 0, 0
    with torch.no_grad():
        for opts in (dict(do_sample=False), dict(do_sample=False, num_beams=2)):
            want = generate(model, ids, mask, **opts)
            got = generate(model, ids, mask, cache_implementation="static", disable_compile=True, **opts)
            assert torch.equal(got, want), opts
        # transformers' own compile of the decode step (on CPU only when asked), fullgraph, two calls
        torch._dynamo.reset()
        graphs = []

        def backend(gm, example_inputs):
            # a function, not a counter object: 4.57's CompileConfig.to_dict() deep-copies the backend
            graphs.append(gm)
            return gm.forward

        config = CompileConfig(backend=backend, fullgraph=True, mode=None)
        config._compile_all_devices = True
        for _ in range(2):
            got = generate(
                model, ids, mask, do_sample=False, cache_implementation="static", compile_config=config
            )
            assert torch.equal(got, generate(model, ids, mask, do_sample=False))
        assert len(graphs) == 1


def test_compiled_static_decode_has_no_graph_break_and_one_graph(hybrid, tiny_ids):
    torch._dynamo.reset()
    model = hybrid("qwen3", "swa_gla", layers=(0, 1), dtype=torch.float32)
    counter = CompileCounterWithBackend("eager")

    def step(token, position, cache):
        return model(
            token, position_ids=position, cache_position=position[0], use_cache=True, **{CACHE_ARG: cache}
        ).logits

    compiled = torch.compile(step, fullgraph=True, backend=counter)  # fullgraph: a graph break raises
    B, T, steps = 2, 4, 8  # decode crosses the window (W=3) and fills slots the prefill left empty
    for seed in (0, 1):  # two fresh caches
        ids = tiny_ids(B, T + steps, seed=seed)
        results = []
        for fn in (step, compiled):
            cache = StaticCache(config=model.config, max_cache_len=16)
            with torch.no_grad():
                logits = [call(model, ids[:, :T], cache).logits[:, -1]]
                addresses = [t.data_ptr() for t in cache.get_recurrent_state(0)]
                for t in range(T, T + steps):
                    position = torch.full((B, 1), t)
                    logits.append(fn(ids[:, t : t + 1], position, cache)[:, -1])
            assert [t.data_ptr() for t in cache.get_recurrent_state(0)] == addresses
            results.append(torch.stack(logits))
        torch.testing.assert_close(results[1], results[0], rtol=1e-5, atol=1e-5)
        with torch.no_grad():
            full = model(ids).logits[:, T - 1 :].transpose(0, 1)
        torch.testing.assert_close(results[0], full, rtol=1e-4, atol=1e-5)
    assert counter.frame_count == 1
