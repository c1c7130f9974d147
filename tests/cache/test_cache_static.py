"""Static caches and compiled decode (issue 10): a state lives in one static buffer, the token count is a
tensor (a compiled decode step neither guards on it nor recompiles for a new cache), state-only layers
allocate no keys, and a full cache refuses clearly and stays usable. Runs on transformers 4.57 and 5.x."""

import inspect

import pytest
import torch
from torch import nn
from transformers import DynamicCache, Qwen3Config, Qwen3ForCausalLM, StaticCache
from transformers import cache_utils as cu
from transformers.generation import CompileConfig

import swaa.cache as sc
from swaa.layers.host_inputs import cache_argument

NATIVE = getattr(cu, "LinearAttentionLayer", None)
needs_native = pytest.mark.skipif(
    NATIVE is None, reason="transformers < 5.5 has no native linear-attention layers"
)
CACHE_ARG = cache_argument(Qwen3ForCausalLM)
B, H, K, V = 2, 4, 8, 8  # a GLA-shaped state [B, H, K, V] (float32, as swaa keeps it)


@pytest.fixture(autouse=True)
def hacked():
    was = sc.is_hacked()
    sc.hack_kv_cache_recurrent_state()
    yield
    if not was:
        sc.unhack_kv_cache_recurrent_state()


def tiny_config(layers=4):
    return Qwen3Config(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=512,
        attn_implementation="sdpa",
    )


def kv(T, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, 2, T, 8, generator=g), torch.randn(B, 2, T, 8, generator=g)


def positions(start, T):
    # 4.57 static layers write where `cache_position` says; 5.x ignore it and use their own length
    return {"cache_position": torch.arange(start, start + T)}


def gla_state(seed, as_tuple=False):
    g = torch.Generator().manual_seed(seed)
    kv_state = torch.randn(B, H, K, V, generator=g)
    return (kv_state, torch.randn(B, H, K, generator=g)) if as_tuple else kv_state


def tensors(state):
    return state if isinstance(state, tuple) else (state,)


def ptrs(state):
    return [t.data_ptr() for t in tensors(state)]


def assert_state(got, want):
    assert isinstance(got, tuple) == isinstance(want, tuple)
    for a, b in zip(tensors(got), tensors(want)):
        assert torch.equal(a, b)


# ------------------------------------------------------------------------------------------------ buffers


@pytest.mark.parametrize("as_tuple", [False, True], ids=["tensor", "tuple"])
def test_state_update_copies_into_one_static_buffer(as_tuple):
    cache = StaticCache(config=tiny_config(), max_cache_len=64)
    first = gla_state(0, as_tuple)
    stored = cache.state_update(first, 0, {"num_new_tokens": 5})
    # a buffer of the cache's own: equal to the state, never the caller's tensor, marked static for dynamo
    assert_state(stored, first)
    for buf, src in zip(tensors(stored), tensors(first)):
        assert buf is not src and buf.data_ptr() != src.data_ptr()
        assert getattr(buf, "_dynamo_static_input_type", None) == "unguarded"
    addresses = ptrs(stored)
    for step in range(1, 6):
        new = gla_state(step, as_tuple)
        assert cache.state_update(new, 0, {"num_new_tokens": 1}) is stored
        assert cache.get_recurrent_state(0) is stored and ptrs(stored) == addresses
        assert_state(stored, new)
        tensors(new)[0].add_(1.0)  # the caller's tensor is not aliased
        assert not torch.equal(tensors(stored)[0], tensors(new)[0])
    count = cache.get_seq_length(0)
    assert isinstance(count, torch.Tensor) and count.item() == 10
    # the buffer itself (an in-place kernel wrote it): nothing is copied
    versions = [t._version for t in tensors(stored)]
    assert cache.state_update(stored, 0, {"num_new_tokens": 1}) is stored
    assert [t._version for t in tensors(stored)] == versions and cache.get_seq_length(0).item() == 11
    # another layout gets a new buffer of that layout (no silent cast into the old one)
    wide = tuple(t.double() for t in tensors(gla_state(9, as_tuple)))
    wide = wide if as_tuple else wide[0]
    got = cache.state_update(wide, 0)
    assert tensors(got)[0].dtype == torch.float64 and ptrs(got) != addresses
    assert_state(cache.get_recurrent_state(0), wide)


def test_dynamic_cache_still_stores_the_object_itself():
    cache = DynamicCache()
    state = gla_state(0)
    assert cache.state_update(state, 0, {"num_new_tokens": 3}) is state
    assert cache.get_recurrent_state(0) is state and cache.get_seq_length(0) == 3
    assert isinstance(cache.get_seq_length(0), int)
    cache.reorder_cache(torch.tensor([1, 0]))
    assert cache.get_recurrent_state(0) is not state  # a new tensor; the caller's is left as it was
    assert torch.equal(cache.get_recurrent_state(0), state[[1, 0]])
    cache.reset()
    assert cache.get_recurrent_state(0) is None and cache.get_seq_length(0) == 0


def test_reorder_and_reset_work_in_place_on_a_static_cache():
    cache = StaticCache(config=tiny_config(), max_cache_len=64)
    s0, s1 = gla_state(0), gla_state(1, as_tuple=True)
    b0 = cache.state_update(s0, 0, {"num_new_tokens": 4})
    b1 = cache.state_update(s1, 1, {"num_new_tokens": 4})
    k, v = kv(4)
    cache.update(k, v, 3, positions(0, 4))
    addresses = (ptrs(b0), ptrs(b1), cache.layers[0].__dict__[sc._COUNT].data_ptr())
    beam = torch.tensor([1, 1])
    cache.reorder_cache(beam)
    assert cache.get_recurrent_state(0) is b0 and cache.get_recurrent_state(1) is b1
    assert (ptrs(b0), ptrs(b1), cache.layers[0].__dict__[sc._COUNT].data_ptr()) == addresses
    assert_state(b0, s0[beam])
    assert_state(b1, (s1[0][beam], s1[1][beam]))
    assert torch.equal(cache.layers[3].keys[:, :, :4], k[beam])
    cache.reset()
    assert (ptrs(b0), ptrs(b1), cache.layers[0].__dict__[sc._COUNT].data_ptr()) == addresses
    assert all(not t.any() for t in (b0, *b1))
    for i in (0, 1):
        assert cache.get_recurrent_state(i) is None and not cache.is_recurrent_state_initialized(i)
        assert cache.layers[i].recurrent_state_initialized is False
    assert cache.get_seq_length(0).item() == 0 and cache.get_seq_length().item() == 0
    # the next prefill writes into the same buffers
    assert cache.state_update(s0, 0, {"num_new_tokens": 2}) is b0 and torch.equal(b0, s0)
    assert cache.get_seq_length(0).item() == 2


def test_a_static_cache_refuses_to_change_its_batch_size_and_changes_nothing():
    cache = StaticCache(config=tiny_config(), max_cache_len=16)
    state = gla_state(0)
    stored = cache.state_update(state, 0, {"num_new_tokens": 2})
    for call in (
        lambda: cache.batch_repeat_interleave(2),
        lambda: cache.batch_select_indices(torch.tensor([0])),
    ):
        with pytest.raises(
            RuntimeError, match=r"layer 0: StaticLayer cannot batch_.*cannot change its batch size"
        ):
            call()
    with pytest.raises(RuntimeError, match="StaticLayer cannot batch_repeat_interleave"):
        cache.layers[0].batch_repeat_interleave(2)
    assert cache.get_recurrent_state(0) is stored and torch.equal(stored, state)


@needs_native
def test_native_linear_layers_select_in_place_and_resize_into_new_static_buffers():
    layer = NATIVE()
    state = gla_state(0, as_tuple=True)
    stored = layer.state_update(state, {"num_new_tokens": 3})
    addresses = ptrs(stored)
    swap = torch.tensor([1, 0])
    layer.batch_select_indices(swap)  # same batch size: in place
    assert ptrs(layer.get_recurrent_state()) == addresses
    assert_state(layer.get_recurrent_state(), (state[0][swap], state[1][swap]))
    layer.batch_repeat_interleave(1)
    assert ptrs(layer.get_recurrent_state()) == addresses
    layer.batch_repeat_interleave(2)  # a new batch size: new buffers, static again
    got = layer.get_recurrent_state()
    assert got[0].shape[0] == 4 and ptrs(got) != addresses
    assert all(getattr(t, "_dynamo_static_input_type", None) == "unguarded" for t in got)
    assert_state(got, (state[0][swap].repeat_interleave(2, 0), state[1][swap].repeat_interleave(2, 0)))
    assert layer.state_update(tuple(t + 1 for t in got)) is got  # later writes land there


# ------------------------------------------------------------------------------------------------ compile


def counting_backend(inner="eager"):
    """A torch.compile backend that counts the graphs dynamo hands it (a recompile is one more), and the
    list it counts in. A function, not an object: generate() deep-copies its CompileConfig."""
    graphs = []
    compile_with = torch._dynamo.lookup_backend(inner)

    def backend(gm, example_inputs):
        graphs.append(gm)
        return compile_with(gm, example_inputs)

    return backend, graphs


def decode_step(cache, x, k, v):
    """What a hybrid decode step asks of the cache: layer 0 a tensor state, layer 1 a (kv, z) state,
    layer 3 keys; the lengths are read the way positions and mask offsets are."""
    T = k.shape[2]
    offset = cache.get_seq_length(0)  # before this step's tokens: the mask offset a swaa layer uses
    s0 = cache.get_recurrent_state(0)
    cache.state_update(s0 * 0.5 + x[:, :, None, None], 0, {"num_new_tokens": T})
    kv_state, z_state = cache.get_recurrent_state(1)
    cache.state_update((kv_state + 1.0, z_state - x[:, :, None]), 1, {"num_new_tokens": T})
    cache.update(k, v, 3, {"cache_position": torch.arange(T) + offset})
    lengths = [
        cache.get_seq_length(0),
        cache.get_seq_length(1),
        cache.get_seq_length(3),
        cache.get_seq_length(),
    ]
    return torch.stack([torch.as_tensor(n) for n in lengths]), offset


def prefilled_cache(T=4):
    cache = StaticCache(config=tiny_config(), max_cache_len=64)
    cache.state_update(torch.zeros(B, H, K, V), 0, {"num_new_tokens": T})
    cache.state_update((torch.zeros(B, H, K, V), torch.zeros(B, H, K)), 1, {"num_new_tokens": T})
    cache.update(*kv(T), 3, positions(0, T))
    return cache


def run_decode(step, steps=10, T=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    cache = prefilled_cache()
    addresses = ptrs(cache.get_recurrent_state(0)) + ptrs(cache.get_recurrent_state(1))
    out = []
    for _ in range(steps):
        x = torch.randn(B, H, generator=g)
        k, v = torch.randn(B, 2, T, 8, generator=g), torch.randn(B, 2, T, 8, generator=g)
        lengths, offset = step(cache, x, k, v)
        out.append((lengths.clone(), int(offset)))
    assert ptrs(cache.get_recurrent_state(0)) + ptrs(cache.get_recurrent_state(1)) == addresses
    return out, cache


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_compiled_decode_has_no_graph_break_and_no_recompile_across_steps_and_caches(backend):
    torch._dynamo.reset()
    counter, graphs = counting_backend(backend)
    compiled = torch.compile(decode_step, fullgraph=True, backend=counter)  # fullgraph: a graph break raises
    for seed in (0, 1):  # two fresh caches
        want, eager_cache = run_decode(decode_step, seed=seed)
        got, cache = run_decode(compiled, seed=seed)
        assert [(lengths.tolist(), offset) for lengths, offset in got] == [
            (lengths.tolist(), offset) for lengths, offset in want
        ]
        assert got[-1][0].tolist() == [14, 14, 14, 14] and got[-1][1] == 13
        for i in (0, 1):
            assert_state(cache.get_recurrent_state(i), eager_cache.get_recurrent_state(i))
    assert len(graphs) == 1


def test_a_compiled_step_writes_no_state_attribute_of_the_cache_again(monkeypatch):
    # dynamo replays every Python attribute write of the traced step after the graph, at every call (host
    # time of each compiled decode step): the buffer the state is copied into and the "holds a state" flag
    # stay as they are, so neither is written again
    import torch._dynamo.utils as dynamo_utils

    if not hasattr(dynamo_utils, "object_setattr_ignore_descriptor"):
        pytest.skip("this torch replays attribute writes another way")
    torch._dynamo.reset()
    compiled = torch.compile(decode_step, fullgraph=True, backend="eager")
    cache = prefilled_cache()
    g = torch.Generator().manual_seed(0)

    def args(seed):
        return torch.randn(B, H, generator=g), *kv(1, seed=seed)

    compiled(cache, *args(0))
    written = []
    real = dynamo_utils.object_setattr_ignore_descriptor

    def spy(obj, name, value):
        written.append(name)
        return real(obj, name, value)

    monkeypatch.setattr(dynamo_utils, "object_setattr_ignore_descriptor", spy)
    for seed in (1, 2, 3):
        compiled(cache, *args(seed))
    assert written, "the spy saw no attribute write at all: it watches the wrong place"
    assert not {"_swaa_recurrent_state", "recurrent_state_initialized"} & set(written), sorted(set(written))


def test_num_new_tokens_may_be_a_symint_under_dynamic_shapes():
    torch._dynamo.reset()
    counter, graphs = counting_backend()
    compiled = torch.compile(decode_step, fullgraph=True, backend=counter, dynamic=True)
    g = torch.Generator().manual_seed(0)
    cache = prefilled_cache()
    total = 4
    # chunks of several lengths, one graph (0 and 1, and sizes equal to another size such as B, specialize)
    for T in (3, 5, 6):
        k, v = torch.randn(B, 2, T, 8, generator=g), torch.randn(B, 2, T, 8, generator=g)
        lengths, _ = compiled(cache, torch.randn(B, H, generator=g), k, v)
        total += T
        assert lengths.tolist() == [total] * 4
    assert len(graphs) == 1


# ------------------------------------------------------------------------------------------------ models


class StateOnlyMixer(nn.Module):
    """A causal mixer standing in for a swaa linear layer in a tiny Qwen3: it reads and writes its state
    through the cache as ``swaa/layers/common.py`` does (``get_recurrent_state``, then ``state_update`` with
    ``num_new_tokens``, and ``get_seq_length`` for its positions) and keeps a GLA-shaped state, whose
    ``[B, H, K]`` slice of the running sum ``o_t = W (x_1 + ... + x_t) / t`` depends on."""

    def __init__(self, dim, layer_idx):
        super().__init__()
        self.w = nn.Linear(dim, dim, bias=False)
        self.layer_idx = layer_idx

    def forward(self, hidden_states, **kwargs):
        cache = kwargs.get("cache", kwargs.get("past_key_values", kwargs.get("past_key_value")))
        batch, T, D = hidden_states.shape
        prev = cache.get_recurrent_state(self.layer_idx) if cache is not None else None
        if prev is None:
            prev_sum, seen = hidden_states.new_zeros(batch, D), 0
        else:
            prev_sum, seen = prev[:, :, :, 0].reshape(batch, D), cache.get_seq_length(self.layer_idx)
        sums = prev_sum[:, None] + hidden_states.cumsum(1)
        if cache is not None:
            state = torch.zeros(batch, H, K, V, dtype=torch.float32, device=hidden_states.device)
            state[:, :, :, 0] = sums[:, -1].reshape(batch, H, K)
            cache.state_update(state, self.layer_idx, {"num_new_tokens": T})
        steps = torch.arange(1, T + 1, dtype=hidden_states.dtype, device=hidden_states.device) + seen
        return self.w(sums / steps[None, :, None]), None


def tiny_model(linear=(0, 1, 2)):
    torch.manual_seed(0)
    model = Qwen3ForCausalLM(tiny_config()).eval()
    model.generation_config.eos_token_id = None
    for i in linear:
        model.model.layers[i].self_attn = StateOnlyMixer(32, i)
    return model


def generate(model, ids, **kwargs):
    with torch.no_grad():
        return model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=8,
            do_sample=False,
            pad_token_id=0,
            **kwargs,
        )


def test_generate_with_a_static_cache_matches_dynamic_and_compiles_once():
    model = tiny_model()
    ids = torch.randint(1, 64, (B, 5), generator=torch.Generator().manual_seed(1))
    want = generate(model, ids)
    # eager decode, twice: 4.57 reuses the cache of the first call (reading every layer's batch size)
    for _ in range(2):
        assert torch.equal(generate(model, ids, cache_implementation="static", disable_compile=True), want)
    # transformers' automatic compile of the decode step (on CPU only when asked), fullgraph, two calls
    torch._dynamo.reset()
    counter, graphs = counting_backend()
    config = CompileConfig(backend=counter, fullgraph=True, mode=None)
    config._compile_all_devices = True
    for _ in range(2):
        assert torch.equal(generate(model, ids, cache_implementation="static", compile_config=config), want)
    assert len(graphs) == 1


def cache_bytes(cache):
    total = 0
    for layer in cache.layers:
        for name in ("keys", "values", sc._STATE, sc._COUNT):
            value = getattr(layer, name, None)
            total += (
                sum(t.nbytes for t in tensors(value) if isinstance(t, torch.Tensor))
                if value is not None
                else 0
            )
    return total


def prefill(model, cache, T=6):
    ids = torch.randint(1, 64, (B, T), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        model(input_ids=ids, use_cache=True, **{CACHE_ARG: cache})


def test_state_only_static_layers_allocate_no_keys():
    max_len = 256
    hybrid, softmax = tiny_model(), tiny_model(linear=())
    cache, full = (
        StaticCache(config=hybrid.config, max_cache_len=max_len),
        StaticCache(config=softmax.config, max_cache_len=max_len),
    )
    prefill(hybrid, cache)
    prefill(softmax, full)
    kv_layer = 2 * B * 2 * max_len * 8 * 4  # keys + values, [B, kv_heads, max_cache_len, head_dim] float32
    state = B * H * K * V * 4 + 8  # the state buffer and its int64 token count
    for i in (0, 1, 2):
        assert cache.layers[i].keys is None and cache.layers[i].values is None
        assert cache.get_recurrent_state(i).shape == (B, H, K, V)
    assert cache.layers[3].keys.shape == (B, 2, max_len, 8)
    assert cache_bytes(full) == 4 * kv_layer and cache_bytes(cache) == kv_layer + 3 * state
    assert cache.get_seq_length().item() == 6 and cache.get_seq_length(3).item() == 6


@pytest.mark.parametrize("count", [3, 10])
def test_a_state_only_sliding_static_layer_sizes_masks_like_one_that_saw_the_tokens(count):
    # sliding static layers size their masks from a Python int: the patch keeps one for the state's count
    mask_arg = (
        (lambda q: torch.arange(q))
        if "cache_position" in inspect.signature(cu.StaticSlidingWindowLayer.get_mask_sizes).parameters
        else (lambda q: q)
    )
    state_only = cu.StaticSlidingWindowLayer(max_cache_len=16, sliding_window=4)
    state_only.state_update(gla_state(0), {"num_new_tokens": count})
    with_keys = cu.StaticSlidingWindowLayer(max_cache_len=16, sliding_window=4)
    with_keys.update(*kv(count), positions(0, count))
    assert int(state_only.get_seq_length()) == int(with_keys.get_seq_length()) == count
    for q in (1, 3):
        assert state_only.get_mask_sizes(mask_arg(q)) == with_keys.get_mask_sizes(mask_arg(q))
    assert state_only.keys is None


# ------------------------------------------------------------------------------------------------ a full cache


def test_a_full_static_cache_raises_a_clear_error_and_stays_usable():
    cache = StaticCache(config=tiny_config(), max_cache_len=8)
    k, v = kv(6)
    cache.update(k, v, 3, positions(0, 6))
    state = cache.state_update(gla_state(0), 0, {"num_new_tokens": 6}).clone()
    with pytest.raises(
        ValueError, match=r"cannot add 3 tokens to StaticLayer: it holds 6 of its max_cache_len=8"
    ):
        cache.update(*kv(3, seed=1), 3, positions(6, 3))
    with pytest.raises(
        ValueError, match=r"recurrent state of StaticLayer: it holds 6 of its max_cache_len=8"
    ):
        cache.state_update(gla_state(1), 0, {"num_new_tokens": 3})
    # nothing moved: lengths, keys and state are as before, and the cache takes what still fits
    assert cache.get_seq_length(3).item() == 6 and cache.get_seq_length(0).item() == 6
    assert torch.equal(cache.layers[3].keys[:, :, :6], k) and not cache.layers[3].keys[:, :, 6:].any()
    assert torch.equal(cache.get_recurrent_state(0), state)
    k2, v2 = kv(2, seed=2)
    cache.update(k2, v2, 3, positions(6, 2))
    cache.state_update(gla_state(2), 0, {"num_new_tokens": 2})
    assert cache.get_seq_length(3).item() == 8 and cache.get_seq_length(0).item() == 8
    assert torch.equal(cache.layers[3].keys[:, :, 6:], k2)


def test_a_prompt_longer_than_the_static_cache_is_refused_by_the_model_forward():
    model = tiny_model()
    cache = StaticCache(config=model.config, max_cache_len=8)
    prefill(model, cache, T=6)
    before = cache.get_recurrent_state(0).clone()
    ids = torch.randint(1, 64, (B, 3), generator=torch.Generator().manual_seed(3))
    with pytest.raises(ValueError, match="max_cache_len=8"), torch.no_grad():
        model(input_ids=ids, use_cache=True, **{CACHE_ARG: cache})
    assert cache.get_seq_length().item() == 6 and torch.equal(cache.get_recurrent_state(0), before)
    with torch.no_grad():
        model(input_ids=ids[:, :2], use_cache=True, **{CACHE_ARG: cache})
    assert cache.get_seq_length().item() == 8


def test_the_eager_length_check_sees_what_compiled_steps_wrote():
    torch._dynamo.reset()
    compiled = torch.compile(decode_step, fullgraph=True, backend="eager")
    cache = StaticCache(config=tiny_config(), max_cache_len=8)
    cache.state_update(torch.zeros(B, H, K, V), 0, {"num_new_tokens": 4})
    cache.state_update((torch.zeros(B, H, K, V), torch.zeros(B, H, K)), 1, {"num_new_tokens": 4})
    cache.update(*kv(4), 3, positions(0, 4))
    g = torch.Generator().manual_seed(0)
    for _ in range(3):  # compiled steps move the lengths on the device only
        compiled(cache, torch.randn(B, H, generator=g), *kv(1, seed=5))
    assert cache.get_seq_length(3).item() == 7
    with pytest.raises(ValueError, match="it holds 7 of its max_cache_len=8"):
        cache.update(*kv(2), 3, positions(7, 2))
    with pytest.raises(ValueError, match="it holds 7 of its max_cache_len=8"):
        cache.state_update(torch.zeros(B, H, K, V), 0, {"num_new_tokens": 2})
