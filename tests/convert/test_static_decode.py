"""Static-cache decode of converted hybrids on CPU (issue 10): generate(cache_implementation="static")
gives DynamicCache's tokens (greedy, left-padded, beams) for every layout; transformers' automatic
compile of the decode step builds one graph with no break over many steps and fresh caches; the state
buffers keep their address through decode, beam reorder and reset; converted layers hold no KV; a run
past the static cache's length is a clear error that leaves the cache usable."""

import pytest
import torch
from transformers import CompileConfig, StaticCache

from swaa.convert import convert_to_hybrid

LAYOUTS = {"layer 0": [0], "all": "all", "mixed": [0, 2]}


def hybrid(tiny_model, family, kind, layers):
    model = tiny_model(family, dtype=torch.float64)
    model.generation_config.eos_token_id = None  # every run decodes the same number of tokens
    return convert_to_hybrid(model, layers, kind=kind)


def generate(model, ids, mask, **kwargs):
    with torch.no_grad():
        return model.generate(
            ids, attention_mask=mask, max_new_tokens=10, do_sample=False, pad_token_id=0, **kwargs
        )


def left_padded(tiny_ids):
    ids = tiny_ids(2, 7)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    return ids, mask


@pytest.mark.parametrize("family", ["qwen3", "llama"])
@pytest.mark.parametrize("kind", ["gla", "linear", "swa_gla"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_static_generate_gives_the_dynamic_tokens(tiny_model, tiny_ids, family, kind, layout):
    model = hybrid(tiny_model, family, kind, LAYOUTS[layout])
    ids, mask = left_padded(tiny_ids)
    want = generate(model, ids, mask)
    assert torch.equal(generate(model, ids, mask, cache_implementation="static", disable_compile=True), want)
    beams = generate(model, ids, mask, num_beams=2)
    assert torch.equal(generate(model, ids, mask, num_beams=2, cache_implementation="static"), beams)


def counting_backend():
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    return backend, graphs


@pytest.mark.parametrize("kind", ["gla", "linear"])
def test_the_compiled_decode_step_is_one_graph_over_steps_and_fresh_caches(tiny_model, tiny_ids, kind):
    model = hybrid(tiny_model, "qwen3", kind, [0, 1, 3])
    ids, mask = left_padded(tiny_ids)
    want = generate(model, ids, mask)
    torch._dynamo.reset()
    backend, graphs = counting_backend()
    config = CompileConfig(backend=backend, fullgraph=True, mode=None)
    config._compile_all_devices = True  # transformers compiles on CPU only when asked
    for _ in range(2):  # each call builds a fresh static cache
        got = generate(model, ids, mask, cache_implementation="static", compile_config=config)
        assert torch.equal(got, want)
    assert len(graphs) == 1  # fullgraph=True: a graph break would have raised


def test_state_buffers_keep_their_address_and_converted_layers_hold_no_kv(tiny_model, tiny_ids):
    model = hybrid(tiny_model, "qwen3", "gla", [0, 1, 3])
    cache = StaticCache(config=model.config, max_cache_len=24)
    ids = tiny_ids(2, 6)
    with torch.no_grad():
        logits = model(ids, past_key_values=cache, use_cache=True).logits
        addresses = [cache.get_recurrent_state(i).data_ptr() for i in (0, 1, 3)]
        for t in range(4):
            token = logits[:, -1:].argmax(-1)
            logits = model(
                token, past_key_values=cache, position_ids=torch.full((2, 1), 6 + t), use_cache=True
            ).logits
        cache.reorder_cache(torch.tensor([1, 0]))
        moved = [cache.get_recurrent_state(i).data_ptr() for i in (0, 1, 3)]
        cache.reset()
        emptied = [cache.get_recurrent_state(i) for i in (0, 1, 3)]
        model(ids, past_key_values=cache, use_cache=True)  # a new sequence, into the same buffers
        again = [cache.get_recurrent_state(i).data_ptr() for i in (0, 1, 3)]
    assert moved == addresses
    assert emptied == [None, None, None] and again == addresses
    for i in (0, 1, 3):
        assert getattr(cache.layers[i], "keys", None) is None  # a converted layer allocates no KV
    assert cache.layers[2].keys is not None and cache.layers[2].keys.shape[2] == 24


def test_a_run_past_the_static_cache_is_a_clear_error_and_the_cache_stays_usable(tiny_model, tiny_ids):
    model = hybrid(tiny_model, "qwen3", "gla", [0, 1])
    cache = StaticCache(config=model.config, max_cache_len=8)
    ids = tiny_ids(1, 6)
    with torch.no_grad():
        model(ids, past_key_values=cache, use_cache=True)
        state = cache.get_recurrent_state(0).clone()
        with pytest.raises(ValueError, match="max_cache_len"):
            model(tiny_ids(1, 3), past_key_values=cache, use_cache=True)
        assert torch.equal(cache.get_recurrent_state(0), state)
        model(tiny_ids(1, 2), past_key_values=cache, use_cache=True)  # what fits still goes in
    assert int(cache.get_seq_length(0)) == 8
