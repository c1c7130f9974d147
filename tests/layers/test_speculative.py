"""Exact speculative decoding on hybrids (issue 13): the layers hand the cache what rolling their state
back needs, so assisted (`assistant_model=`) and prompt-lookup (`prompt_lookup_num_tokens=`) decoding
give plain greedy's tokens, sample from the model's own distribution, and leave the state a fresh run
over the accepted tokens would. Tiny random models in float64, on transformers 4.57 and 5.x."""

import copy

import pytest
import torch
import transformers
from transformers import DynamicCache, Qwen3ForCausalLM

import swaa.cache as sc
from swaa.layers import GatedLinearAttention, LinearAttention
from swaa.layers.host_inputs import cache_argument

TF4 = int(transformers.__version__.split(".")[0]) < 5
CACHE_ARG = cache_argument(Qwen3ForCausalLM)
KINDS = {
    "gla": (GatedLinearAttention, {}),
    "linear": (LinearAttention, {}),
    "linear-normalized": (LinearAttention, {"normalize": True}),
}
NEW = 40


def build(tiny_model, family, layers, kind, seed=0, num_layers=3, dtype=torch.float64):
    """A tiny random `family` model whose `layers` are `kind`, the replaced attention's weights copied in."""
    extra = dict(attention_bias=True) if family == "llama" else {}
    model = tiny_model(family, seed=seed, num_hidden_layers=num_layers, **extra)
    cls, opts = KINDS[kind]
    for i in layers:
        new = cls(model.config, i, **opts)
        new.load_state_dict(model.model.layers[i].self_attn.state_dict(), strict=False)
        model.model.layers[i].self_attn = new
    # never stop early on a random eos (4.57's prompt lookup needs an eos id, so it is suppressed instead)
    model.generation_config.suppress_tokens = [model.config.eos_token_id]
    return model.to(dtype).eval()


def generated_cache(out):
    """The cache generate() returns: `past_key_values` up to some 5.x release, `cache` after it."""
    return out.cache if hasattr(out, "cache") else out.past_key_values


def repetitive_prompt(tiny_ids):
    """A prompt that repeats itself, so prompt lookup finds drafts (some right, some wrong)."""
    part = tiny_ids(1, 9)
    return torch.cat([part, tiny_ids(1, 4, seed=2), part, part[:, :5]], dim=1)


def generate(model, ids, **kwargs):
    with torch.no_grad():
        return model.generate(ids, max_new_tokens=NEW, do_sample=False, **kwargs)


@pytest.fixture
def rollbacks(monkeypatch):
    """Every crop that moved a recurrent state: (tokens removed, tokens the state had)."""
    seen = []
    orig = sc._set_rolled_back

    def spy(layer, target, state):
        seen.append((sc._count_value(layer) - target, sc._count_value(layer)))
        return orig(layer, target, state)

    monkeypatch.setattr(sc, "_set_rolled_back", spy)
    return seen


def linear_states(model, cache):
    return {
        i: cache.get_recurrent_state(i)
        for i, block in enumerate(model.model.layers)
        if isinstance(block.self_attn, (GatedLinearAttention, LinearAttention))
    }


def assert_states_close(got, want):
    assert got.keys() == want.keys()
    for i in got:
        for a, b in zip(sc._tensors(got[i]), sc._tensors(want[i])):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def assert_cache_is_a_fresh_run(model, cache, sequence):
    """The linear layers' states equal a fresh prefill over the tokens the cache holds."""
    held = int(cache.get_seq_length())
    fresh = DynamicCache()
    with torch.no_grad():
        model(sequence[:, :held], **{CACHE_ARG: fresh, "use_cache": True})
    assert_states_close(linear_states(model, cache), linear_states(model, fresh))


# the state after a crop, layer by layer


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("removed", [0, 1, 4, 6])
def test_state_after_crop_equals_a_fresh_run_over_the_kept_tokens(kind, removed, tiny_config):
    torch.manual_seed(0)
    cls, opts = KINDS[kind]
    layer = cls(tiny_config("qwen3"), 0, **opts).double().eval()
    layer.reset_parameters()
    x = torch.randn(2, 15, layer.hidden_size, dtype=torch.float64)
    cache = DynamicCache()
    cache.activate_past_recording()
    with torch.no_grad():
        layer(x[:, :9], past_key_values=cache)  # prefill
        layer(x[:, 9:], past_key_values=cache)  # a verification step of 6 tokens
        kept = 15 - removed
        cache.crop(kept if TF4 else -removed)
        fresh = DynamicCache()
        layer(x[:, :kept], past_key_values=fresh)
        assert cache.get_seq_length() == fresh.get_seq_length() == kept
        for a, b in zip(sc._tensors(cache.get_recurrent_state(0)), sc._tensors(fresh.get_recurrent_state(0))):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
        # and the next step goes on from there as from the fresh run
        nxt = torch.randn(2, 1, layer.hidden_size, dtype=torch.float64)
        torch.testing.assert_close(
            layer(nxt, past_key_values=cache)[0], layer(nxt, past_key_values=fresh)[0], rtol=1e-10, atol=1e-10
        )


def test_crop_past_what_was_kept_raises_and_changes_nothing(tiny_config):
    layer = GatedLinearAttention(tiny_config("qwen3"), 0).double().eval()
    x = torch.randn(1, 12, layer.hidden_size, dtype=torch.float64)
    cache = DynamicCache()
    cache.activate_past_recording()
    with torch.no_grad():
        layer(x[:, :8], past_key_values=cache)
        layer(x[:, 8:], past_key_values=cache)
        cache.crop(10 if TF4 else -2)
        state = cache.get_recurrent_state(0)
        with pytest.raises(RuntimeError, match="layer 0: .*cannot be rolled back to 9 tokens"):
            cache.crop(9 if TF4 else -1)  # behind the last crop
    assert cache.get_recurrent_state(0) is state and cache.get_seq_length() == 10


# generate(): assisted and prompt-lookup decoding equal plain greedy

MODELS = [
    pytest.param("qwen3", (0,), "gla", id="qwen3-gla-first"),
    pytest.param("qwen3", (1,), "linear", id="qwen3-linear-middle"),
    pytest.param("qwen3", (0, 1, 2), "linear-normalized", id="qwen3-normalized-all"),
    pytest.param("llama", (0, 1, 2), "gla", id="llama-gla-all"),
    pytest.param("llama", (1,), "linear-normalized", id="llama-normalized-middle"),
]


@pytest.mark.parametrize("family, layers, kind", MODELS)
def test_prompt_lookup_greedy_equals_greedy(family, layers, kind, tiny_model, tiny_ids, rollbacks):
    model = build(tiny_model, family, layers, kind)
    ids = repetitive_prompt(tiny_ids)
    want = generate(model, ids)
    for k in (2, 5):
        rollbacks.clear()
        got = generate(model, ids, prompt_lookup_num_tokens=k)
        # (4.57's prompt lookup may run past max_new_tokens by a draft; plain softmax models alike)
        assert torch.equal(got[:, : want.shape[1]], want)
        assert any(r > 0 for r, _ in rollbacks)  # drafts were rejected and rolled back


ASSISTANTS = ["same", "close", "other-hybrid", "softmax"]


def assistant_for(which, model, tiny_model, family):
    """`same`: a copy (every draft accepted: crops of none); `close`: the copy with noise on its
    weights (some accepted); `other-hybrid`: another random hybrid (most rejected: crops of all);
    `softmax`: a random model without linear layers."""
    if which in ("same", "close"):
        assistant = copy.deepcopy(model)
        if which == "close":
            g = torch.Generator().manual_seed(5)
            with torch.no_grad():
                for p in assistant.parameters():
                    p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.05 * p.std().nan_to_num())
        return assistant
    layers = (0,) if which == "other-hybrid" else ()
    return build(tiny_model, family, layers, "gla", seed=7, num_layers=2)


@pytest.mark.parametrize("which", ASSISTANTS)
@pytest.mark.parametrize("family, layers, kind", MODELS[:2] + MODELS[3:4])
def test_assisted_greedy_equals_greedy(family, layers, kind, which, tiny_model, tiny_ids, rollbacks):
    model = build(tiny_model, family, layers, kind)
    ids = tiny_ids(1, 7)
    want = generate(model, ids)
    assistant = assistant_for(which, model, tiny_model, family)
    out = generate(model, ids, assistant_model=assistant, return_dict_in_generate=True)
    assert torch.equal(out.sequences, want)
    removed = [r for r, _ in rollbacks]
    if which == "same":
        assert not any(removed)  # every draft accepted
    elif which in ("close", "other-hybrid"):
        assert any(removed)  # drafts were rolled back, the main model's and (hybrid) the assistant's
    # the cache generate returns holds the states of a fresh run over its tokens
    cache = generated_cache(out)
    assert_cache_is_a_fresh_run(model, cache, out.sequences)


def test_crops_of_every_length_happen_and_stay_exact(tiny_model, tiny_ids, rollbacks):
    # a close assistant drafting 6 tokens a step: crops of none, some and all of a draft
    model = build(tiny_model, "qwen3", (0, 2), "gla")
    assistant = assistant_for("close", model, tiny_model, "qwen3")
    assistant.generation_config.num_assistant_tokens = 6
    assistant.generation_config.num_assistant_tokens_schedule = "constant"
    assistant.generation_config.assistant_confidence_threshold = 0.0
    ids = tiny_ids(1, 7)
    want = generate(model, ids)
    assert torch.equal(generate(model, ids, assistant_model=assistant), want)
    removed = {r for r, _ in rollbacks}
    assert 0 in removed and len(removed - {0}) >= 2


@pytest.mark.parametrize("mode", ["assisted", "prompt-lookup"])
def test_sampling_draws_from_the_models_own_distribution(mode, tiny_model, tiny_ids):
    # every token is drawn from the logits the model gives its prefix: generate's reported logits equal a
    # teacher-forced forward over the sampled sequence (so speculative sampling sees the exact distribution)
    model = build(tiny_model, "qwen3", (0, 1), "gla")
    ids = repetitive_prompt(tiny_ids)
    extra = (
        {"assistant_model": assistant_for("close", model, tiny_model, "qwen3")}
        if mode == "assisted"
        else {"prompt_lookup_num_tokens": 3}
    )
    torch.manual_seed(3)
    with torch.no_grad():
        out = model.generate(
            ids,
            max_new_tokens=NEW,
            do_sample=True,
            return_dict_in_generate=True,
            output_logits=True,
            **extra,
        )
        seq = out.sequences
        steps = torch.stack(out.logits, dim=1)[:, :NEW]  # [1, new, vocab]
        forced = model(seq).logits[:, ids.shape[1] - 1 : ids.shape[1] - 1 + steps.shape[1]]
    # (to 1e-6: RoPE's cos/sin are float32 even in a float64 model; a wrong state is off by O(1))
    torch.testing.assert_close(steps.to(forced.dtype), forced, rtol=1e-6, atol=1e-6)


def test_beam_search_is_unaffected(tiny_model, tiny_ids):
    # beam search never crops, and nothing is kept for a rollback (no layer records the past)
    model = build(tiny_model, "qwen3", (0, 1), "gla")
    ids = tiny_ids(2, 6)
    with torch.no_grad():
        out = model.generate(
            ids, max_new_tokens=12, num_beams=3, do_sample=False, return_dict_in_generate=True
        )
        uncached = model.generate(ids, max_new_tokens=12, num_beams=3, do_sample=False, use_cache=False)
    assert torch.equal(out.sequences, uncached)
    cache = generated_cache(out)
    assert all(sc._LOG not in layer.__dict__ for layer in cache.layers)


@pytest.mark.skipif(TF4, reason="transformers 4.x refuses assisted generation with a static cache")
def test_assisted_on_a_static_cache_equals_greedy(tiny_model, tiny_ids, rollbacks):
    model = build(tiny_model, "qwen3", (0, 1), "gla")
    ids = tiny_ids(1, 7)
    want = generate(model, ids)
    assistant = assistant_for("close", model, tiny_model, "qwen3")
    got = generate(model, ids, assistant_model=assistant, cache_implementation="static")
    assert torch.equal(got, want) and any(r for r, _ in rollbacks)


# GPU: FLA's kernels in bf16


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("mode", ["assisted", "prompt-lookup"])
def test_speculative_greedy_equals_greedy_through_fla_in_bf16(mode, tiny_model, tiny_ids):
    pytest.importorskip("fla")
    model = build(tiny_model, "qwen3", (0, 1), "gla", dtype=torch.bfloat16)
    ids = repetitive_prompt(tiny_ids).cuda()
    if mode == "assisted":  # the assistant's noise is drawn on the CPU, before either model moves
        extra = {"assistant_model": assistant_for("close", model, tiny_model, "qwen3").cuda()}
    else:
        extra = {"prompt_lookup_num_tokens": 4}
    model = model.cuda()
    with torch.no_grad():
        want = model.generate(
            ids, max_new_tokens=NEW, do_sample=False, return_dict_in_generate=True, output_logits=True
        )
        out = model.generate(ids, max_new_tokens=NEW, do_sample=False, return_dict_in_generate=True, **extra)
    got, ref = out.sequences[:, : want.sequences.shape[1]], want.sequences
    if not torch.equal(got, ref):
        # bf16 kernels of different shapes (verification vs decode) may round a near-tie the other way
        first = int((got != ref).nonzero()[0, 1]) - ids.shape[1]
        top = torch.topk(want.logits[first][0].float(), 2).values
        assert float(top[0] - top[1]) < 0.05, f"tokens differ at {first} without a near-tie"
        return
    # state within the kernels' tolerance of a fresh run over the same tokens
    cache = generated_cache(out)
    held = int(cache.get_seq_length())
    fresh = DynamicCache()
    with torch.no_grad():
        model(out.sequences[:, :held], **{CACHE_ARG: fresh, "use_cache": True})
    for i, state in linear_states(model, cache).items():
        ref_state = fresh.get_recurrent_state(i)
        torch.testing.assert_close(state, ref_state, rtol=2e-2, atol=2e-2)
