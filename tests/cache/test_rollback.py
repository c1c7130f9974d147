"""Rolling a recurrent state back (issue 13): while a layer records the past, `crop` returns its state to any
length since the last crop, exactly, from what `state_update` kept; refused crops change nothing; and a
state of another batch size is refused (issue 11 item 5). A toy recurrence stands in for the kernels (the
cache knows none): state' = state / 2 + x_t, exact in float64. Runs on transformers 4.57 and 5.x."""

import pytest
import torch
import transformers
from transformers import DynamicCache, StaticCache
from transformers import cache_utils as cu

import swaa.cache as sc

TF4 = int(transformers.__version__.split(".")[0]) < 5
B, D = 2, 3


@pytest.fixture(autouse=True)
def hacked():
    was = sc.is_hacked()
    sc.hack_kv_cache_recurrent_state()
    yield
    if not was:
        sc.unhack_kv_cache_recurrent_state()


def absorb(state, x, unused=None):
    """The toy recurrence over `x [B, n, D]` from `state [B, D]` (None: zeros)."""
    s = torch.zeros(x.shape[0], D, dtype=x.dtype) if state is None else state
    for t in range(x.shape[1]):
        s = s / 2 + x[:, t]
    return s


def tokens(n, seed=0, batch=B):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, n, D, generator=g, dtype=torch.float64)


def feed(cache, x, layer=0, inputs=True):
    """One call over `x`, as a swaa layer makes it (inputs handed over unless `inputs=False`)."""
    before = cache.get_recurrent_state(layer)
    kwargs = {"num_new_tokens": x.shape[1]}
    if inputs:
        kwargs["rollback"] = (absorb, (x, None))
    return cache.state_update(absorb(before, x), layer, kwargs)


def crop_to(cache, length, layer=0):
    """`crop` to `length` tokens, whichever meaning the installed transformers gives its argument."""
    cache.crop(length if TF4 else length - int(cache.get_seq_length(layer)))


def recording_cache(layers=1):
    cache = DynamicCache()
    for i in range(layers):
        cache.state_update(None, i)  # reads create nothing: make the layers exist first
    cache.activate_past_recording()
    return cache


def test_crop_into_the_last_call_equals_a_fresh_run():
    x = tokens(12)
    for kept in (5, 6, 9, 11, 12):
        cache = recording_cache()
        feed(cache, x[:, :5])
        feed(cache, x[:, 5:])  # a verification step of 7 tokens
        crop_to(cache, kept)
        assert cache.get_seq_length() == kept
        torch.testing.assert_close(
            cache.get_recurrent_state(0), absorb(None, x[:, :kept]), rtol=0, atol=1e-12
        )


def test_crop_reaches_back_over_several_calls_since_the_last_crop():
    x = tokens(10)
    cache = recording_cache()
    feed(cache, x[:, :4])
    for t in range(4, 10):  # a draft, one token a call (an assistant model's own decode steps)
        feed(cache, x[:, t : t + 1], inputs=t % 2 == 0)  # some calls hand no inputs: a state is kept then
    crop_to(cache, 6)
    torch.testing.assert_close(cache.get_recurrent_state(0), absorb(None, x[:, :6]), rtol=0, atol=1e-12)
    # the last crop is the new floor: further back is refused, nothing changes
    held = cache.get_recurrent_state(0)
    with pytest.raises(RuntimeError, match=r"cannot be rolled back to 5 tokens: .*nothing was changed"):
        crop_to(cache, 5)
    assert cache.get_recurrent_state(0) is held and cache.get_seq_length() == 6


def test_a_call_without_its_inputs_rolls_back_whole_or_not_at_all():
    x = tokens(8)
    cache = recording_cache()
    feed(cache, x[:, :3], inputs=False)
    feed(cache, x[:, 3:], inputs=False)
    with pytest.raises(RuntimeError, match="cannot be rolled back to 5 tokens"):
        crop_to(cache, 5)
    crop_to(cache, 3)
    torch.testing.assert_close(cache.get_recurrent_state(0), absorb(None, x[:, :3]), rtol=0, atol=0)


def test_without_recording_crop_is_refused_as_before_and_changes_nothing():
    cache = DynamicCache()
    cache.update(*kv(5), 0)
    s = feed(cache, tokens(5), layer=1)
    keys = cache.layers[0].keys
    with pytest.raises(RuntimeError, match=r"layer 1: .*cannot be rolled back.*activate_past_recording"):
        crop_to(cache, 3)
    assert cache.layers[0].keys is keys and cache.get_recurrent_state(1) is s
    assert cache.get_seq_length(1) == 5
    # no tokens, or all of them: exact without any record
    crop_to(cache, 5)
    assert cache.get_recurrent_state(1) is s
    crop_to(cache, 0)
    assert cache.get_recurrent_state(1) is None and cache.get_seq_length(1) == 0


def kv(T, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, 2, T, 4, generator=g), torch.randn(B, 2, T, 4, generator=g)


def test_a_refused_crop_leaves_every_layer_as_it_was():
    cache = recording_cache(layers=2)
    cache.update(*kv(6), 0)
    x = tokens(6)
    feed(cache, x[:, :2], layer=1, inputs=False)
    feed(cache, x[:, 2:], layer=1, inputs=False)
    keys, state = cache.layers[0].keys, cache.get_recurrent_state(1)
    with pytest.raises(RuntimeError, match="layer 1"):
        crop_to(cache, 4)
    assert cache.layers[0].keys is keys and cache.get_recurrent_state(1) is state
    crop_to(cache, 2)  # the start of the last call is reachable
    assert cache.layers[0].keys.shape[-2] == 2 and cache.get_seq_length(1) == 2


def test_memory_goes_at_the_crop_and_stays_bounded_without_one(monkeypatch):
    x = tokens(41)
    cache = recording_cache()
    feed(cache, x[:, :10])
    assert cache.layers[0].__dict__[sc._LOG] is not None
    crop_to(cache, 10)  # nothing to undo: what was kept goes
    assert sc._LOG not in cache.layers[0].__dict__
    # past MAX_ROLLBACK_TOKENS the oldest tokens are absorbed into the kept state
    monkeypatch.setattr(sc, "MAX_ROLLBACK_TOKENS", 8)
    for t in range(10, 40, 3):
        feed(cache, x[:, t : t + 3])
    log = cache.layers[0].__dict__[sc._LOG]
    assert log.floor == 40 - 8 and sum(s.n for s in log.segments) == 8
    assert sum(c[0].shape[1] for s in log.segments for c in s.chunks) == 8
    crop_to(cache, 33)
    torch.testing.assert_close(cache.get_recurrent_state(0), absorb(None, x[:, :33]), rtol=0, atol=1e-12)
    feed(cache, x[:, 33:40])
    feed(cache, x[:, 40:41], inputs=False)  # a state kept for this one: the first stays reachable
    with pytest.raises(RuntimeError, match="reaches back only to 33 tokens .*MAX_ROLLBACK_TOKENS = 8"):
        crop_to(cache, 32)


def test_a_long_call_is_advanced_to_the_bound_at_once(monkeypatch):
    monkeypatch.setattr(sc, "MAX_ROLLBACK_TOKENS", 4)
    x = tokens(20)
    cache = recording_cache()
    feed(cache, x)  # a prefill: only its last 4 tokens stay as inputs
    log = cache.layers[0].__dict__[sc._LOG]
    assert log.floor == 16 and log.segments[0].chunks[0][0].shape[1] == 4
    crop_to(cache, 17)
    torch.testing.assert_close(cache.get_recurrent_state(0), absorb(None, x[:, :17]), rtol=0, atol=1e-12)


def test_batch_operations_carry_what_was_kept():
    x = tokens(6)
    cache = recording_cache()
    feed(cache, x[:, :2])
    feed(cache, x[:, 2:])
    cache.reorder_cache(torch.tensor([1, 0]))
    crop_to(cache, 4)
    torch.testing.assert_close(cache.get_recurrent_state(0), absorb(None, x[[1, 0], :4]), rtol=0, atol=1e-12)
    feed(cache, x[:, 4:])
    cache.batch_select_indices(torch.tensor([1]))
    crop_to(cache, 5)
    torch.testing.assert_close(
        cache.get_recurrent_state(0), absorb(absorb(None, x[[0], :4]), x[[1], 4:5]), rtol=0, atol=1e-12
    )


def test_a_deep_copy_rolls_back_on_its_own():
    import copy

    x = tokens(6)
    cache = recording_cache()
    feed(cache, x[:, :2])
    feed(cache, x[:, 2:])
    twin = copy.deepcopy(cache)
    segment = twin.layers[0].__dict__[sc._LOG].segments[0]
    assert segment.absorb is absorb  # the tensors are copied, the function is not
    crop_to(twin, 3)
    crop_to(cache, 5)
    torch.testing.assert_close(twin.get_recurrent_state(0), absorb(None, x[:, :3]), rtol=0, atol=1e-12)
    torch.testing.assert_close(cache.get_recurrent_state(0), absorb(None, x[:, :5]), rtol=0, atol=1e-12)


def test_reset_forgets_what_was_kept():
    cache = recording_cache()
    feed(cache, tokens(4))
    cache.reset()
    assert sc._LOG not in cache.layers[0].__dict__ and cache.get_seq_length() == 0


def test_layers_created_after_the_cache_was_asked_to_record_record_too():
    cache = DynamicCache()
    cache.activate_past_recording()
    x = tokens(5)
    feed(cache, x[:, :2], layer=2)
    feed(cache, x[:, 2:], layer=2)
    assert cache.layers[2].record_past is True
    crop_to(cache, 3, layer=2)
    torch.testing.assert_close(cache.get_recurrent_state(2), absorb(None, x[:, :3]), rtol=0, atol=1e-12)


@pytest.mark.skipif(TF4, reason="transformers 4.x has no is_croppable")
def test_is_croppable_says_whether_a_held_state_rolls_back():
    cache = DynamicCache()
    feed(cache, tokens(3))
    assert not cache.layers[0].is_croppable and not cache.is_croppable
    cache.activate_past_recording()
    assert cache.layers[0].is_croppable and cache.is_croppable
    assert cu.DynamicLayer().is_croppable  # no state: as transformers says


@pytest.mark.skipif(TF4, reason="transformers 4.x StaticLayer has no crop")
def test_static_layer_rolls_back_in_place():
    from transformers import Qwen3Config

    config = Qwen3Config(
        hidden_size=16, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, head_dim=8
    )
    cache = StaticCache(config=config, max_cache_len=32)
    cache.activate_past_recording()
    x = tokens(9)
    buffer = feed(cache, x[:, :4])
    ptr = buffer.data_ptr()
    assert feed(cache, x[:, 4:]) is buffer  # copied into the buffer, the state before it kept aside
    crop_to(cache, 6)
    assert cache.get_recurrent_state(0).data_ptr() == ptr
    torch.testing.assert_close(cache.get_recurrent_state(0), absorb(None, x[:, :6]), rtol=0, atol=1e-12)
    assert int(cache.get_seq_length()) == 6
    # a state written in place into the buffer leaves nothing to roll back to
    cache.state_update(buffer, 0, {"num_new_tokens": 1})
    with pytest.raises(RuntimeError, match="written in place"):
        crop_to(cache, 6)


def test_bad_rollback_inputs_are_refused_and_change_nothing():
    cache = recording_cache()
    s = feed(cache, tokens(3))
    x = tokens(2)
    cases = [
        (("not callable", (x,)), TypeError, "absorb"),
        ((absorb, x), TypeError, "inputs"),
        ((absorb,), TypeError, "tuple"),
        ((absorb, (tokens(3),)), ValueError, r"num_new_tokens=2"),
    ]
    for rollback, err, match in cases:
        with pytest.raises(err, match=match):
            cache.state_update(absorb(s, x), 0, {"num_new_tokens": 2, "rollback": rollback})
        assert cache.get_recurrent_state(0) is s and cache.get_seq_length() == 3
    with pytest.raises(ValueError, match="needs `cache_kwargs\\['num_new_tokens'\\]`"):
        cache.state_update(s, 0, {"rollback": (absorb, (x,))})


def test_crop_argument_is_checked_before_anything_changes():
    cache = recording_cache()
    s = feed(cache, tokens(3))
    with pytest.raises(TypeError, match="must be an int"):
        cache.crop(1.5)
    if not TF4:
        with pytest.raises(ValueError, match="must be <= 0"):
            cache.layers[0].crop(2)
    assert cache.get_recurrent_state(0) is s


# issue 11 item 5: a state of the wrong batch size


def test_state_of_another_batch_than_the_keys_is_refused():
    cache = DynamicCache()
    cache.update(*kv(4), 0)  # keys of batch 2
    with pytest.raises(ValueError, match=r"batch size 3, but the keys .* batch size 2"):
        cache.state_update(torch.zeros(3, 5), 0, {"num_new_tokens": 1})
    assert cache.get_recurrent_state(0) is None and cache.get_seq_length(0) == 4
    layer = cu.DynamicLayer()
    with pytest.raises(ValueError, match=r"batch size 3, but the keys .* batch size 2"):
        layer.update(*kv(2), {"recurrent_state": torch.zeros(3, 5), "num_new_tokens": 2})


def test_state_of_another_batch_than_the_previous_state_is_refused():
    cache = DynamicCache()
    s = torch.zeros(2, 5)
    cache.state_update(s, 0, {"num_new_tokens": 2})
    for bad in (torch.zeros(3, 5), (torch.zeros(1, 5), torch.zeros(1))):
        with pytest.raises(
            ValueError, match=r"batch size \d, but the state this DynamicLayer holds has batch size 2"
        ):
            cache.state_update(bad, 0, {"num_new_tokens": 1})
        with pytest.raises(ValueError, match="batch size"):
            cache.layers[0].set_recurrent_state(bad)
    assert cache.get_recurrent_state(0) is s and cache.get_seq_length(0) == 2
    cache.reorder_cache(torch.tensor([1, 0]))  # nothing dropped: both rows are there
    assert cache.get_recurrent_state(0).shape == (2, 5)
    # a cleared layer takes any batch again
    cache.reset()
    cache.state_update(torch.zeros(3, 5), 0)


@pytest.mark.skipif(not TF4, reason="transformers 5.x turns past recording on itself")
def test_generate_turns_recording_on_for_assisted_decoding_on_4x():
    from transformers.generation.utils import GenerationMixin

    assert "_prepare_cache_for_generation" in sc._saved.get(GenerationMixin, {})
    sc.unhack_kv_cache_recurrent_state()
    assert not hasattr(cu.Cache, "activate_past_recording")
    assert not hasattr(GenerationMixin._prepare_cache_for_generation, "__wrapped__")
    sc.hack_kv_cache_recurrent_state()
