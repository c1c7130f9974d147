"""The layers inside tiny random Qwen3 and Llama models, swapped in by hand
(``model.model.layers[i].self_attn = GatedLinearAttention(model.config, i)``): the round trips a user
relies on in forward, training and generate(), on transformers 4.57 and 5.x."""

import pytest
import torch
import transformers
from transformers import DynamicCache, Qwen3ForCausalLM

from swaa.layers import GatedLinearAttention, LinearAttention
from swaa.layers.host_inputs import cache_argument

# transformers 5.2x renamed the model's `past_key_values` argument (and output field) to `cache`
CACHE_ARG = cache_argument(Qwen3ForCausalLM)

# three layers: a first, a middle and a last one to swap; Llama with biases on every projection
LAYERS = 3


@pytest.fixture
def tiny(tiny_model):
    """A tiny random model of `family` with the attention of `linear_layers` replaced by `kind`, the
    replaced attention's weights copied into it."""

    def build(family, linear_layers, kind, attn="sdpa", dtype=torch.float64, **opts):
        extra = dict(attention_bias=True) if family == "llama" else {}
        model = tiny_model(family, num_hidden_layers=LAYERS, attn_implementation=attn, **extra)
        cls = GatedLinearAttention if kind == "gla" else LinearAttention
        for i in linear_layers:
            old = model.model.layers[i].self_attn
            new = cls(model.config, i, **opts)
            assert new.load_state_dict(old.state_dict(), strict=False).unexpected_keys == []
            model.model.layers[i].self_attn = new
        # the generation tests must not stop early on a random eos
        model.generation_config.eos_token_id = None
        return model.to(dtype).eval()

    return build


def call(model, ids, cache=None, **kwargs):
    if cache is not None:
        kwargs[CACHE_ARG] = cache
        kwargs["use_cache"] = True
    return model(ids, **kwargs)


MODELS = [
    pytest.param("qwen3", "gla", id="qwen3-gla"),
    pytest.param("qwen3", "linear", id="qwen3-linear"),
    pytest.param("llama", "gla", id="llama-gla"),
    pytest.param("llama", "linear", id="llama-linear"),
]
# layer 0 linear (the cache's length then comes from a state-only layer), a middle one, all of them
LAYOUTS = [pytest.param((0,), id="first"), pytest.param((1,), id="middle"), pytest.param((0, 1, 2), id="all")]


@pytest.mark.parametrize("layers", LAYOUTS)
@pytest.mark.parametrize("family, kind", MODELS)
def test_prefill_then_decode_and_chunked_prefill_equal_one_forward(family, kind, layers, tiny, tiny_ids):
    model = tiny(family, layers, kind)
    ids = tiny_ids(2, 10)
    with torch.no_grad():
        full = model(ids).logits
        # no position_ids anywhere: positions come from cache.get_seq_length(), which a state-only
        # layer 0 must answer right
        for chunks in ((6, 1, 1, 1, 1), (3, 4, 3)):
            cache = DynamicCache()
            logits, start = [], 0
            for n in chunks:
                logits.append(call(model, ids[:, start : start + n], cache).logits)
                start += n
                assert cache.get_seq_length() == start
            torch.testing.assert_close(torch.cat(logits, 1), full, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("family, kind", MODELS)
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_left_padded_batch_equals_each_sequence_alone(family, kind, attn, tiny, tiny_ids, softmax_tolerance):
    # layers 0 and 2 linear, 1 softmax: the softmax layer sees the padding through its own mask
    model = tiny(family, (0, 2), kind, attn=attn)
    lengths = [8, 5, 2]
    B, T = len(lengths), max(lengths)
    seqs = [tiny_ids(1, n, seed=10 + n) for n in lengths]
    ids = torch.zeros(B, T, dtype=torch.long)
    mask = torch.zeros(B, T, dtype=torch.long)
    for b, (s, n) in enumerate(zip(seqs, lengths)):
        ids[b, T - n :], mask[b, T - n :] = s[0], 1
    nxt = tiny_ids(B, 1, seed=3)
    # position_ids given: RoPE of a padded batch otherwise differs by float32 noise (TRANSFORMERS_NOTES)
    pos = (mask.cumsum(1) - 1).clamp(min=0)
    with torch.no_grad():
        cache = DynamicCache()
        out = call(model, ids, cache, attention_mask=mask, position_ids=pos).logits
        mask2 = torch.cat([mask, torch.ones(B, 1, dtype=torch.long)], 1)
        step = call(model, nxt, cache, attention_mask=mask2, position_ids=pos[:, -1:] + 1).logits
        for b, (s, n) in enumerate(zip(seqs, lengths)):
            alone_cache = DynamicCache()
            alone = call(model, s, alone_cache).logits
            alone_step = call(model, nxt[b : b + 1], alone_cache).logits
            tol = softmax_tolerance(attn)
            torch.testing.assert_close(out[b, T - n :], alone[0], **tol)
            torch.testing.assert_close(step[b], alone_step[0], **tol)
            for i in (0, 2):
                padded, single = cache.get_recurrent_state(i), alone_cache.get_recurrent_state(i)
                # layer 0 comes before the softmax layer: exact whatever its attention
                exact = dict(rtol=1e-9, atol=1e-9) if i == 0 else tol
                for p, q in zip(
                    padded if isinstance(padded, tuple) else (padded,),
                    single if isinstance(single, tuple) else (single,),
                ):
                    torch.testing.assert_close(p[b : b + 1], q, **exact)


@pytest.mark.parametrize("family, kind", MODELS[::2])
def test_use_cache_false_makes_no_cache(family, kind, tiny, tiny_ids):
    model = tiny(family, (0,), kind)
    out = model(tiny_ids(1, 4), use_cache=False)
    assert getattr(out, CACHE_ARG) is None


def generate(model, ids, mask, **kwargs):
    return model.generate(ids, attention_mask=mask, max_new_tokens=6, pad_token_id=0, **kwargs)


@pytest.mark.parametrize("family, kind", MODELS)
def test_generate_with_and_without_cache_gives_the_same_tokens(family, kind, tiny, tiny_ids):
    model = tiny(family, (0, 2), kind)
    ids = tiny_ids(2, 5)
    mask = torch.ones_like(ids)
    ids[1, :2], mask[1, :2] = 0, 0
    for opts in (dict(do_sample=False), dict(do_sample=False, num_beams=3)):
        cached = generate(model, ids, mask, use_cache=True, **opts)
        uncached = generate(model, ids, mask, use_cache=False, **opts)
        assert cached.shape == (2, 11)
        assert torch.equal(cached, uncached), opts


@pytest.mark.parametrize("family, kind", MODELS[:2])
def test_greedy_generate_of_a_padded_batch_equals_each_prompt_alone(family, kind, tiny, tiny_ids):
    model = tiny(family, (0, 2), kind)
    lengths = [6, 3]
    prompts = [tiny_ids(1, n, seed=20 + n) for n in lengths]
    ids = torch.zeros(2, 6, dtype=torch.long)
    mask = torch.zeros(2, 6, dtype=torch.long)
    for b, (p, n) in enumerate(zip(prompts, lengths)):
        ids[b, 6 - n :], mask[b, 6 - n :] = p[0], 1
    batch = generate(model, ids, mask, do_sample=False)
    for b, p in enumerate(prompts):
        alone = generate(model, p, torch.ones_like(p), do_sample=False)
        assert torch.equal(batch[b, 6:], alone[0, p.shape[1] :])


@pytest.mark.parametrize("family, kind", MODELS[:2])
def test_seeded_sampling_is_reproducible(family, kind, tiny, tiny_ids):
    model = tiny(family, (0, 2), kind)
    ids = tiny_ids(2, 4)
    runs = []
    for _ in range(2):
        torch.manual_seed(1234)
        runs.append(generate(model, ids, torch.ones_like(ids), do_sample=True, top_k=0, temperature=1.5))
    assert torch.equal(runs[0], runs[1])


@pytest.mark.parametrize("family, kind", MODELS)
def test_training_gradients_reach_every_parameter(family, kind, tiny, tiny_ids):
    model = tiny(family, (0, 2), kind, dtype=torch.float32, output_gate=True).train()
    ids = tiny_ids(2, 7)
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    loss = model(ids, attention_mask=mask, labels=ids).loss
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        if ".self_attn." in name and int(name.split(".")[2]) in (0, 2):
            assert p.grad.abs().sum() > 0, name


def test_bf16_model_runs_with_float32_states(tiny, tiny_ids):
    model = tiny("qwen3", (0, 2), "gla", dtype=torch.bfloat16)
    ids = tiny_ids(2, 6)
    cache = DynamicCache()
    with torch.no_grad():
        out = call(model, ids, cache).logits
        call(model, ids[:, :1], cache)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    assert cache.get_recurrent_state(0).dtype == torch.float32
    assert cache.get_seq_length() == 7


@pytest.mark.skipif(
    not hasattr(transformers.cache_utils, "LinearAttentionLayer"),
    reason="transformers < 5.5 has no native linear-attention cache layers",
)
def test_native_linear_attention_cache_layers_hold_the_state(tiny, tiny_ids):
    # a Llama config whose layer_types name the swapped layers "linear_attention" makes
    # DynamicCache(config=...) build transformers' own LinearAttentionLayer there; the layer must work on it
    model = tiny("llama", (0, 2), "gla")
    model.config.layer_types = ["linear_attention", "full_attention", "linear_attention"]
    ids = tiny_ids(2, 8)
    with torch.no_grad():
        full = model(ids).logits
        cache = DynamicCache(config=model.config)
        assert type(cache.layers[0]).__name__ == "LinearAttentionLayer"
        logits = [call(model, ids[:, :5], cache).logits]
        logits += [call(model, ids[:, t : t + 1], cache).logits for t in range(5, 8)]
    assert cache.get_seq_length() == 8
    torch.testing.assert_close(torch.cat(logits, 1), full, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("family", ["qwen3", "llama"])
@pytest.mark.parametrize("kind", ["gla", "linear"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_sequences_stay_apart(family, kind, attn, tiny, tiny_ids):
    # DataCollatorWithFlattening packs sequences into one row with restarting position_ids; transformers
    # keeps them apart in its softmax layers, and a linear layer must not carry state across them
    model = tiny(family, [0, 2], kind, attn=attn)
    lengths = [5, 9, 3]
    seqs = [tiny_ids(1, n, seed=s) for s, n in enumerate(lengths, start=3)]
    packed = torch.cat(seqs, dim=1)
    position_ids = torch.cat([torch.arange(n) for n in lengths])[None]
    with torch.no_grad():
        logits = model(packed, position_ids=position_ids, use_cache=False).logits
        alone = [model(s, use_cache=False).logits for s in seqs]
    # (float32 RoPE tables in transformers: ~3e-8 apart even in float64; a leak across sequences is O(0.1))
    torch.testing.assert_close(logits, torch.cat(alone, dim=1), rtol=1e-6, atol=1e-6)


def test_packed_rows_of_a_batch_and_flash_style_cu_seq_lens():
    # two rows each packing two sequences, and the same tokens as one row with FlashAttention's
    # cu_seq_lens_q keyword (as DataCollatorWithFlattening(return_flash_attn_kwargs=True) passes it)
    layer = GatedLinearAttention(
        layer_idx=0, hidden_size=32, num_heads=4, num_kv_heads=2, head_dim=8
    ).double()
    x = torch.randn(2, 10, 32, dtype=torch.float64)
    position_ids = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 3, 4, 5], [0, 1, 2, 3, 4, 5, 6, 0, 1, 2]])
    out, _ = layer(x, position_ids=position_ids)
    pieces = [(0, 0, 4), (0, 4, 10), (1, 0, 7), (1, 7, 10)]
    for row, a, b in pieces:
        alone, _ = layer(x[row : row + 1, a:b])
        torch.testing.assert_close(out[row : row + 1, a:b], alone, rtol=1e-10, atol=1e-12)
    flat = x.reshape(1, 20, 32)
    cu = torch.tensor([0, 4, 10, 17, 20])
    out_cu, _ = layer(flat, cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=7, max_length_k=7)
    torch.testing.assert_close(out_cu.reshape(2, 10, 32), out, rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="cache"):
        layer(flat, cu_seq_lens_q=cu, past_key_values=DynamicCache())
    with pytest.raises(ValueError, match="batch size 1"):
        layer(x, cu_seq_lens_q=cu)


def test_positions_that_repeat_or_are_3d_are_not_packing():
    # a vision-language model's text positions repeat over image tokens inside one sequence, and some
    # models pass 3D (multimodal RoPE) positions: neither splits the sequence, neither is an error
    layer = GatedLinearAttention(
        layer_idx=0, hidden_size=32, num_heads=4, num_kv_heads=2, head_dim=8
    ).double()
    x = torch.randn(2, 9, 32, dtype=torch.float64)
    whole, _ = layer(x)
    repeated = torch.tensor([[0, 1, 2, 2, 2, 2, 3, 4, 5]]).expand(2, 9)
    torch.testing.assert_close(layer(x, position_ids=repeated)[0], whole, rtol=0, atol=0)
    three_d = torch.arange(9).expand(3, 2, 9)
    torch.testing.assert_close(layer(x, position_ids=three_d)[0], whole, rtol=0, atol=0)


@pytest.mark.parametrize("kind", ["gla", "linear"])
def test_inference_mode_without_a_cache(kind, tiny, tiny_ids):
    # inference tensors have no version counter: the packing check must not rely on one
    model = tiny("qwen3", [0, 2], kind)
    ids = tiny_ids(2, 9)
    with torch.no_grad():
        expected = model(ids, use_cache=False).logits
    with torch.inference_mode():
        got = model(ids, use_cache=False).logits
        generated = model.generate(ids, max_new_tokens=3, do_sample=False, use_cache=False)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    assert generated.shape == (2, 12)
