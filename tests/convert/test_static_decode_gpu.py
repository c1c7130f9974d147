"""Fast decode of a converted hybrid on CUDA (marked gpu, skipped without CUDA): transformers' compiled
static-cache generate (CUDA graphs) gives the tokens of DynamicCache, a captured decode step replays to
the eager step, and a decode step makes no host sync."""

import copy

import pytest
import torch
from transformers import Qwen3Config, Qwen3ForCausalLM, StaticCache

from swaa.convert import convert_to_hybrid

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


def hybrid(layers=(0, 1, 3), kind="gla", dtype=torch.float32):
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
    model = Qwen3ForCausalLM(config).eval()
    return convert_to_hybrid(model, list(layers), kind=kind).to("cuda", dtype)


def prompt(B=2, T=9, padded=True):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 128, (B, T), generator=g)
    mask = torch.ones_like(ids)
    if padded:
        mask[0, :3] = 0
    return ids.cuda(), mask.cuda()


@pytest.mark.parametrize("kind", ["gla", "linear"])
def test_compiled_static_generate_gives_the_dynamic_tokens(kind):
    torch._dynamo.reset()
    model = hybrid(kind=kind)
    ids, mask = prompt()
    with torch.no_grad():
        dynamic = model.generate(ids, attention_mask=mask, max_new_tokens=16, do_sample=False, pad_token_id=0)
        # transformers compiles the decode step itself (mode="reduce-overhead": CUDA graphs)
        for _ in range(2):  # the second call replays graphs recorded by the first
            static = model.generate(
                ids,
                attention_mask=mask,
                max_new_tokens=16,
                do_sample=False,
                pad_token_id=0,
                cache_implementation="static",
            )
            assert torch.equal(static, dynamic)


def test_a_captured_decode_step_replays_to_the_eager_step():
    model = hybrid()
    ids, _ = prompt(padded=False)
    cache = StaticCache(config=model.config, max_cache_len=32)
    with torch.no_grad():
        logits = model(ids, past_key_values=cache, use_cache=True).logits
        twin = copy.deepcopy(cache)
        token = logits[:, -1:].argmax(-1)
        position = torch.full((2, 1), ids.shape[1], device="cuda")
        expected = model(token, past_key_values=twin, position_ids=position, use_cache=True).logits

        graph_cache = copy.deepcopy(cache)
        static_token, static_position = token.clone(), position.clone()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        warm = copy.deepcopy(cache)
        with torch.cuda.stream(stream):
            model(static_token, past_key_values=warm, position_ids=static_position, use_cache=True)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        snapshot = [copy.deepcopy(graph_cache.get_recurrent_state(i)) for i in (0, 1, 3)]
        with torch.cuda.graph(graph):
            out = model(
                static_token, past_key_values=graph_cache, position_ids=static_position, use_cache=True
            )
        # capture records without running: put the states back as they were before it, then replay
        for i, state in zip((0, 1, 3), snapshot):
            graph_cache.get_recurrent_state(i).copy_(state)
        graph.replay()
        torch.testing.assert_close(out.logits, expected, rtol=1e-4, atol=1e-4)
        for i in (0, 1, 3):
            torch.testing.assert_close(graph_cache.get_recurrent_state(i), twin.get_recurrent_state(i))


def test_a_static_decode_step_makes_no_host_sync():
    model = hybrid(dtype=torch.bfloat16)
    ids, _ = prompt(padded=False)
    cache = StaticCache(config=model.config, max_cache_len=32)
    with torch.no_grad():
        logits = model(ids, past_key_values=cache, use_cache=True).logits
        token = logits[:, -1:].argmax(-1)
        position = torch.full((2, 1), ids.shape[1], device="cuda")
        model(token, past_key_values=cache, position_ids=position, use_cache=True)  # warm-up (autotune)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            for linear_idx in (0, 1, 3):
                layer = model.model.layers[linear_idx].self_attn
                hidden = torch.randn(2, 1, 64, device="cuda", dtype=torch.bfloat16)
                cos = torch.ones(2, 1, 16, device="cuda", dtype=torch.bfloat16)
                layer(hidden, past_key_values=cache, position_embeddings=(cos, torch.zeros_like(cos)))
        finally:
            torch.cuda.set_sync_debug_mode("default")
