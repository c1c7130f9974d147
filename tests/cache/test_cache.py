"""The recurrent-state cache patch (issue 2): API contract, batch operations, errors, hack/unhack."""

import copy
import inspect
import threading
import time

import pytest
import torch
import transformers
from transformers import DynamicCache, Qwen3Config
from transformers import cache_utils as cu

import swaa
import swaa.cache as sc
import swaa_patch
from swaa.cache import hack_kv_cache_recurrent_state, unhack_kv_cache_recurrent_state

NATIVE = getattr(cu, "LinearAttentionLayer", None)
needs_native = pytest.mark.skipif(
    NATIVE is None, reason="transformers < 5.5 has no native linear-attention layers"
)
LAYER_API = ("state_update", "get_recurrent_state", "set_recurrent_state", "is_recurrent_state_initialized")
# 5.x passes `query_length` to get_mask_sizes, 4.57 a `cache_position` tensor
MASK_TAKES_POSITIONS = "cache_position" in inspect.signature(cu.DynamicLayer.get_mask_sizes).parameters
# 4.x: `crop(n)` keeps n tokens (5.x: `crop(-n)` removes n), `lazy_initialization(keys)` takes keys only
TF4 = int(transformers.__version__.split(".")[0]) < 5


class CountingReorderLayer(cu.DynamicLayer):
    """A user subclass defined before the hack that overrides a batch method and calls super()."""

    def reorder_cache(self, beam_idx):
        self.reorders = getattr(self, "reorders", 0) + 1
        super().reorder_cache(beam_idx)


class IdentityQuantizedLayer(cu.QuantizedLayer):
    """QuantizedLayer with a no-op 'quantizer', so the stock class can be exercised without quanto/hqq."""

    def _quantize(self, tensor, axis):
        return tensor.clone()

    def _dequantize(self, q_tensor):
        return q_tensor.clone()


@pytest.fixture(autouse=True)
def hacked():
    # leave the patch as other tests found it (swaa layers apply it themselves)
    was = sc.is_hacked()
    hack_kv_cache_recurrent_state()
    yield
    if not was:
        unhack_kv_cache_recurrent_state()


def family():
    roots = [cu.CacheLayerMixin] + [
        getattr(cu, n) for n in ("LinearAttentionCacheLayerMixin", "DummyLayer") if hasattr(cu, n)
    ]
    return sc._subclasses_of(roots) + sc._subclasses_of([cu.Cache])


def snapshot():
    # `copy.deepcopy` makes copyreg cache `__slotnames__` on a class: the standard library's doing, not ours
    return {cls: {k: v for k, v in cls.__dict__.items() if k != "__slotnames__"} for cls in family()}


def assert_same_dicts(before, after):
    assert before.keys() == after.keys()
    for cls, d in before.items():
        now = after[cls]
        assert set(now) == set(d), f"{cls.__name__}: {set(now) ^ set(d)}"
        changed = [k for k in d if now[k] is not d[k]]
        assert not changed, f"{cls.__name__}: {changed} not restored"


def mask_sizes(layer, q):
    return layer.get_mask_sizes(torch.arange(q) if MASK_TAKES_POSITIONS else q)


def kv(B=2, T=3, H=2, D=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, H, T, D, generator=g), torch.randn(B, H, T, D, generator=g)


def tiny_qwen3_config(**kw):
    return Qwen3Config(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=128,
        **kw,
    )


# ------------------------------------------------------------------------------------------------ exports


def test_alias_package_and_top_level_give_the_same_functions():
    assert swaa_patch.hack_kv_cache_recurrent_state is sc.hack_kv_cache_recurrent_state
    assert swaa_patch.unhack_kv_cache_recurrent_state is sc.unhack_kv_cache_recurrent_state
    assert swaa.hack_kv_cache_recurrent_state is sc.hack_kv_cache_recurrent_state
    assert swaa.unhack_kv_cache_recurrent_state is sc.unhack_kv_cache_recurrent_state


def test_every_layer_class_and_cache_class_gets_the_api():
    layer_classes = [c for c in family() if not issubclass(c, cu.Cache)]
    # the walk finds more than a fixed list would: user subclasses and version-specific classes
    assert CountingReorderLayer in layer_classes and IdentityQuantizedLayer in layer_classes
    assert {cu.DynamicLayer, cu.DynamicSlidingWindowLayer, cu.StaticLayer, cu.QuantizedLayer} <= set(
        layer_classes
    )
    for cls in layer_classes:
        for name in LAYER_API:
            assert callable(getattr(cls, name, None)), f"{cls.__name__}.{name}"
    for cls in sc._subclasses_of([cu.Cache]):
        for name in ("state_update", "get_recurrent_state", "is_recurrent_state_initialized"):
            assert callable(getattr(cls, name, None)), f"{cls.__name__}.{name}"


def test_hack_covers_layer_classes_defined_later_when_called_again():
    class LateLayer(cu.DynamicLayer):
        def reset(self):
            super().reset()

    layer = LateLayer()
    layer.state_update(torch.ones(1))
    hack_kv_cache_recurrent_state()  # picks LateLayer's own reset up
    layer.reset()
    assert layer.get_recurrent_state() is None


def test_classes_with_their_own_update_protocol_are_left_alone():
    # FLA's cache subclasses transformers' but stores states through update(recurrent_state=..., layer_idx=...):
    # wrapping it with the key/value signature broke every FLA model in a process that imported swaa
    class OwnLayer(cu.DynamicLayer):
        def update(self, recurrent_state=None, offset=1, cache_kwargs=None):
            self.seen = getattr(self, "seen", 0) + offset
            return {"recurrent_state": recurrent_state}

    class OwnCache(cu.Cache):
        def __init__(self):
            self.layers = [OwnLayer()]

        def update(self, recurrent_state=None, attn_state=None, layer_idx=0, offset=1, cache_kwargs=None):
            return self.layers[layer_idx].update(recurrent_state=recurrent_state, offset=offset)

    stock = OwnCache.__dict__["update"], OwnLayer.__dict__["update"]
    hack_kv_cache_recurrent_state()  # picks the new classes up
    assert (OwnCache.__dict__["update"], OwnLayer.__dict__["update"]) == stock
    cache, state = OwnCache(), torch.ones(2)
    assert cache.update(recurrent_state=state, layer_idx=0, offset=3)["recurrent_state"] is state
    assert cache.layers[0].seen == 3


# ------------------------------------------------------------------------------------------------ layer API


def test_layer_state_update_stores_the_object_itself_and_reads_with_none():
    layer = cu.DynamicLayer()
    assert layer.recurrent_state_initialized is False and not layer.is_recurrent_state_initialized()
    assert layer.state_update(None) is None and layer.get_recurrent_state() is None
    s1, s2 = torch.randn(2, 3), torch.randn(2, 3)
    assert layer.state_update(s1) is s1
    assert layer.get_recurrent_state() is s1 and layer.state_update(None) is s1
    assert layer.recurrent_state_initialized is True and layer.is_recurrent_state_initialized()
    assert layer.state_update(s2) is s2 and layer.get_recurrent_state() is s2  # overwrites, no accumulation
    assert torch.equal(s1, s1.clone())  # untouched


def test_init_state_records_dtype_and_device_from_first_tensor():
    layer = cu.DynamicLayer()
    layer.state_update(torch.zeros(2, dtype=torch.float64))
    assert not hasattr(layer, "recurrent_dtype")
    state = (torch.zeros(2, 3, dtype=torch.float16), torch.zeros(2, dtype=torch.float32))
    assert layer.state_update(state, {"init_state": True}) is state
    assert layer.recurrent_dtype == torch.float16 and layer.recurrent_device == torch.device("cpu")
    assert layer.get_recurrent_state() is state


def test_set_recurrent_state_and_clear():
    layer = cu.DynamicSlidingWindowLayer(sliding_window=4)
    s = torch.ones(3)
    assert layer.set_recurrent_state(s) is s and layer.get_recurrent_state() is s
    layer.set_recurrent_state(None)
    assert layer.get_recurrent_state() is None and layer.recurrent_state_initialized is False


@pytest.mark.parametrize("how", ["positional", "keyword"])
def test_update_hands_the_state_over_through_the_kv_path(how):
    k, v = kv()
    s = torch.randn(2, 2, 4, 4)
    cache = DynamicCache()
    ck = {"recurrent_state": s}
    if how == "positional":
        keys, values = cache.update(k, v, 1, ck)
    else:
        keys, values = cache.update(k, v, 1, cache_kwargs=ck)
    assert torch.equal(keys, k) and torch.equal(values, v)
    assert cache.get_recurrent_state(1) is s and cache.layers[1].get_seq_length() == 3
    # without the key, update leaves the state alone
    cache.update(*kv(seed=1), 1, {"other": 1})
    assert cache.get_recurrent_state(1) is s and cache.layers[1].get_seq_length() == 6
    # layer level, both spellings
    layer = cu.DynamicLayer()
    s2 = (torch.randn(2, 2), torch.randn(2))
    layer.update(k, v, {"recurrent_state": s2}) if how == "positional" else layer.update(
        k, v, cache_kwargs={"recurrent_state": s2}
    )
    assert layer.get_recurrent_state() is s2 and layer.get_seq_length() == 3


def test_update_counts_num_new_tokens_once_through_super_chains():
    # DynamicSlidingWindowLayer.update does not call super, DynamicIndexedLayer (5.x) inherits: both count once
    for layer in (cu.DynamicSlidingWindowLayer(sliding_window=8), cu.DynamicLayer()):
        layer.update(*kv(T=2), {"recurrent_state": torch.ones(2), "num_new_tokens": 2})
        assert layer.__dict__[sc._COUNT] == 2


# ------------------------------------------------------------------------------------------------ cache API


def test_cache_state_update_creates_missing_layers_lazily():
    cache = DynamicCache()
    s = torch.randn(2, 4)
    assert cache.state_update(s, 2) is s
    assert len(cache.layers) == 3 and all(type(layer) is cu.DynamicLayer for layer in cache.layers)
    assert cache.get_recurrent_state(2) is s and cache.state_update(None, 2) is s
    assert cache.is_recurrent_state_initialized(2) and not cache.is_recurrent_state_initialized(0)
    assert cache.get_recurrent_state(0) is None
    # missing layers read as empty and are not created by reads
    assert cache.get_recurrent_state(7) is None and not cache.is_recurrent_state_initialized(7)
    assert cache.state_update(None, 7) is None and len(cache.layers) == 3


def test_cache_with_fixed_layers_refuses_missing_layer():
    cache = DynamicCache(config=tiny_qwen3_config())
    assert cache.layer_class_to_replicate is None and len(cache.layers) == 3
    cache.state_update(torch.ones(1), 2)
    with pytest.raises(IndexError, match=r"fixed set of 3 layers.*got 3"):
        cache.state_update(torch.ones(1), 3)
    assert len(cache.layers) == 3
    assert cache.get_recurrent_state(3) is None


def test_encoder_decoder_cache_keeps_the_state_in_its_decoder_cache():
    from transformers import EncoderDecoderCache

    cache = EncoderDecoderCache(DynamicCache(), DynamicCache())
    s = torch.arange(2.0)
    assert cache.state_update(s, 1, {"num_new_tokens": 3}) is s
    assert cache.self_attention_cache.get_recurrent_state(1) is s and cache.get_recurrent_state(1) is s
    assert cache.is_recurrent_state_initialized(1) and cache.get_seq_length(1) == 3
    cache.reorder_cache(torch.tensor([1, 1]))
    assert torch.equal(cache.get_recurrent_state(1), torch.tensor([1.0, 1.0]))
    with pytest.raises(RuntimeError, match="layer 1"):
        cache.crop(-1)


def test_state_only_layer_reports_its_token_count():
    cache = DynamicCache()
    cache.state_update(torch.ones(1), 0, {"num_new_tokens": 7})
    cache.state_update(torch.ones(1), 0, {"num_new_tokens": 3})  # counts add up
    cache.update(*kv(T=10), 1)
    assert cache.get_seq_length() == 10 and cache.get_seq_length(0) == 10
    assert mask_sizes(cache.layers[0], 1) == mask_sizes(cache.layers[1], 1) == (11, 0)
    # a layer with keys keeps answering from its keys
    cache.layers[1].state_update(torch.ones(2), {"num_new_tokens": 99})
    assert cache.get_seq_length(1) == 10
    # static layers too, also once their key buffers are allocated (still empty)
    static = cu.StaticLayer(max_cache_len=8)
    static.state_update(torch.ones(1), {"num_new_tokens": 3})
    assert static.get_seq_length() == 3
    k = torch.zeros(1, 2, 0, 4)
    static.lazy_initialization(k) if TF4 else static.lazy_initialization(k, k)
    assert static.get_seq_length() == 3


@pytest.mark.parametrize("count", [3, 10])
def test_sliding_layer_with_only_a_state_answers_masks_like_one_that_saw_the_tokens(count):
    state_only = cu.DynamicSlidingWindowLayer(sliding_window=4)
    state_only.state_update(torch.ones(1), {"num_new_tokens": count})
    with_keys = cu.DynamicSlidingWindowLayer(sliding_window=4)
    with_keys.update(*kv(T=count))
    assert state_only.get_seq_length() == with_keys.get_seq_length() == count
    for q in (1, 3):
        assert mask_sizes(state_only, q) == mask_sizes(with_keys, q)
    assert state_only.cumulative_length == 0  # the count was swapped in only for the call


def test_reset_clears_state_and_count_and_a_new_state_can_be_stored():
    cache = DynamicCache()
    cache.update(*kv(), 0, {"recurrent_state": torch.ones(2), "num_new_tokens": 3})
    cache.state_update((torch.ones(2), torch.zeros(2)), 1, {"num_new_tokens": 3})
    cache.reset()
    for i in (0, 1):
        assert cache.get_recurrent_state(i) is None and not cache.is_recurrent_state_initialized(i)
        assert cache.layers[i].recurrent_state_initialized is False
    assert cache.get_seq_length(1) == 0
    s = torch.full((2,), 5.0)
    assert cache.state_update(s, 1) is s and cache.get_recurrent_state(1) is s


# ------------------------------------------------------------------------------------------------ batch ops


def _layer_factories():
    out = {
        "dynamic": lambda: cu.DynamicLayer(),
        "sliding": lambda: cu.DynamicSlidingWindowLayer(sliding_window=3),
        "quantized": lambda: IdentityQuantizedLayer(residual_length=2),
        "user_subclass": lambda: CountingReorderLayer(),
        "static": lambda: cu.StaticLayer(max_cache_len=8),
    }
    if hasattr(cu, "DynamicIndexedLayer"):
        out["indexed"] = lambda: cu.DynamicIndexedLayer()
    if NATIVE is not None:
        out["native_linear"] = lambda: cu.LinearAttentionLayer()
        out["native_hybrid"] = lambda: cu.LinearAttentionAndFullAttentionLayer()
    if hasattr(cu, "DummyLayer"):
        out["dummy"] = lambda: cu.DummyLayer()
    return out


FACTORIES = _layer_factories()
# stock QuantizedLayer batch methods see only the residual keys (and 4.57's crash on them): not this patch's business
HAS_KV = {"dynamic", "sliding", "user_subclass", "indexed", "native_hybrid"}
CASES = [(kind, False) for kind in sorted(FACTORIES)] + [
    (kind, True) for kind in sorted(FACTORIES) if kind in HAS_KV
]


def _expected(state, fn):
    return tuple(fn(t) for t in state) if isinstance(state, tuple) else fn(state)


def _assert_state_equal(got, want):
    assert type(got) is type(want)
    if isinstance(want, tuple):
        assert len(got) == len(want) and all(torch.equal(a, b) for a, b in zip(got, want))
    else:
        assert torch.equal(got, want)


@pytest.mark.parametrize("tuple_state", [False, True], ids=["tensor", "tuple"])
@pytest.mark.parametrize(
    "kind,with_keys", CASES, ids=[f"{k}-{'keys' if w else 'state_only'}" for k, w in CASES]
)
def test_batch_operations_carry_the_state_once(kind, tuple_state, with_keys):
    layer = FACTORIES[kind]()
    B = 3
    g = torch.Generator().manual_seed(1)
    state = (
        (torch.randn(B, 2, 4, 4, generator=g), torch.randn(B, 2, 4, generator=g))
        if tuple_state
        else torch.randn(B, 2, 4, 4, generator=g)
    )
    layer.state_update(state, {"num_new_tokens": 5})
    keys = None
    if with_keys:
        k, v = kv(B=B, T=2)
        layer.update(k, v)
        keys = k
    beam = torch.tensor([2, 2, 0])
    ops = [("reorder_cache", beam, lambda t: t[beam])]
    # static layers refuse to change their batch size (tests/test_cache_static.py)
    resizable = not isinstance(layer, cu.StaticLayer)
    if resizable and hasattr(layer, "batch_repeat_interleave"):
        ops.append(("batch_repeat_interleave", 2, lambda t: t.repeat_interleave(2, dim=0)))
    if resizable and hasattr(layer, "batch_select_indices"):
        sel = torch.tensor([0, 3, 5])
        ops.append(("batch_select_indices", sel, lambda t: t[sel]))
    want = state
    for name, arg, fn in ops:
        getattr(layer, name)(arg)
        want = _expected(want, fn)
        _assert_state_equal(layer.get_recurrent_state(), want)
        if keys is not None:
            keys = fn(keys)
            assert torch.equal(layer.keys, keys), name
    assert layer.__dict__[sc._COUNT] == 5  # batch ops keep the count
    if kind == "user_subclass":
        assert layer.reorders == 1
    for name in ("offload", "prefetch"):
        getattr(layer, name)()
        _assert_state_equal(layer.get_recurrent_state(), want)


def test_state_only_layer_with_count_survives_stock_batch_methods_at_cache_level():
    cache = DynamicCache()
    cache.state_update(torch.arange(4.0).reshape(2, 2), 0, {"num_new_tokens": 4})
    cache.update(*kv(B=2, T=4), 1)
    cache.reorder_cache(torch.tensor([1, 0]))
    cache.batch_repeat_interleave(3)
    cache.batch_select_indices(torch.tensor([0, 5]))
    assert torch.equal(cache.get_recurrent_state(0), torch.tensor([[2.0, 3.0], [0.0, 1.0]]))
    assert cache.layers[1].keys.shape[0] == 2 and cache.get_seq_length() == 4


def test_deepcopy_copies_the_state_and_keeps_the_count():
    cache = DynamicCache()
    state = (torch.randn(2, 3), torch.randn(2))
    cache.state_update(state, 1, {"num_new_tokens": 4})
    twin = copy.deepcopy(cache)
    got = twin.get_recurrent_state(1)
    _assert_state_equal(got, state)
    assert got[0] is not state[0] and got[1] is not state[1]
    assert twin.get_seq_length(1) == 4 and twin.is_recurrent_state_initialized(1)
    twin.state_update((torch.zeros(2, 3), torch.zeros(2)), 1)
    assert cache.get_recurrent_state(1) is state  # independent


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_offload_and_prefetch_move_the_state():
    cache = DynamicCache()
    state = (torch.randn(2, 3, device="cuda"), torch.randn(2, device="cuda"))
    cache.state_update(state, 0, {"num_new_tokens": 3})
    cache.update(*(t.cuda() for t in kv()), 1)
    cache.layers[0].offload()
    assert all(t.device.type == "cpu" for t in cache.get_recurrent_state(0))
    cache.layers[0].prefetch()
    torch.cuda.synchronize()
    got = cache.get_recurrent_state(0)
    assert all(t.device.type == "cuda" for t in got)
    _assert_state_equal(got, state)


# ------------------------------------------------------------------------------------------------ crop


def test_crop_refuses_a_layer_holding_a_state_and_changes_nothing():
    cache = DynamicCache()
    cache.update(*kv(T=5), 0)
    s = torch.ones(2)
    cache.state_update(s, 1, {"num_new_tokens": 5})
    keys = cache.layers[0].keys
    with pytest.raises(
        RuntimeError, match=r"layer 1: DynamicLayer holds a recurrent state \(5 absorbed tokens\)"
    ):
        cache.crop(-2)
    assert cache.layers[0].keys is keys and cache.get_recurrent_state(1) is s
    with pytest.raises(RuntimeError, match="cannot be rolled back"):
        cache.layers[1].crop(-2)
    # layers without a state still crop as transformers does
    cache.layers[0].crop(3 if TF4 else -2)
    assert cache.layers[0].get_seq_length() == 3


# ------------------------------------------------------------------------------------------------ errors


BAD_STATES = [
    ([1.0, 2.0], TypeError, "got list"),
    (3.0, TypeError, "got float"),
    ((torch.ones(1), "x"), TypeError, "item 1 is str"),
    ((), ValueError, "empty tuple"),
    ({"s": torch.ones(1)}, TypeError, "got dict"),
]


@pytest.mark.parametrize(
    "bad,exc,msg", BAD_STATES, ids=[type(b[0]).__name__ + str(i) for i, b in enumerate(BAD_STATES)]
)
def test_bad_states_are_refused_and_change_nothing(bad, exc, msg):
    cache = DynamicCache()
    s = torch.ones(2)
    cache.state_update(s, 0, {"num_new_tokens": 2})
    with pytest.raises(exc, match=msg):
        cache.state_update(bad, 0, {"num_new_tokens": 3})
    with pytest.raises(exc, match=msg):
        cache.state_update(bad, 4)
    with pytest.raises(exc, match=msg):
        cache.layers[0].set_recurrent_state(bad)
    with pytest.raises(exc, match=msg):
        cache.update(*kv(), 3, {"recurrent_state": bad})
    with pytest.raises(exc, match=msg):
        cache.layers[0].update(*kv(), cache_kwargs={"recurrent_state": bad})
    assert len(cache.layers) == 1 and cache.get_recurrent_state(0) is s
    assert cache.get_seq_length() == 2 and cache.layers[0].keys is None


@pytest.mark.parametrize(
    "ck,exc,msg",
    [
        ([("num_new_tokens", 1)], TypeError, "`cache_kwargs` must be a dict"),
        ({"num_new_tokens": -1}, ValueError, "must be >= 0, got -1"),
        ({"num_new_tokens": 2.0}, TypeError, "must be an int, got float"),
        ({"num_new_tokens": True}, TypeError, "must be an int, got bool"),
    ],
)
def test_bad_cache_kwargs_are_refused_and_change_nothing(ck, exc, msg):
    cache = DynamicCache()
    s = torch.ones(2)
    cache.state_update(s, 0, {"num_new_tokens": 2})
    with pytest.raises(exc, match=msg):
        cache.state_update(torch.zeros(2), 0, ck)
    with pytest.raises(exc, match=msg):
        cache.state_update(torch.zeros(2), 3, ck)
    assert len(cache.layers) == 1 and cache.get_recurrent_state(0) is s and cache.get_seq_length() == 2


def test_token_count_without_a_state_is_refused():
    cache = DynamicCache()
    with pytest.raises(ValueError, match="without a state"):
        cache.state_update(None, 0, {"num_new_tokens": 4})
    assert cache.get_seq_length() == 0


@pytest.mark.parametrize("method", ["state_update", "get_recurrent_state", "is_recurrent_state_initialized"])
def test_bad_layer_idx(method):
    cache = DynamicCache()
    call = (
        (lambda i: cache.state_update(torch.ones(1), i))
        if method == "state_update"
        else getattr(cache, method)
    )
    with pytest.raises(IndexError, match="`layer_idx` must be >= 0, got -1"):
        call(-1)
    with pytest.raises(TypeError, match="`layer_idx` must be an int, got float"):
        call(1.0)
    with pytest.raises(TypeError, match="got bool"):
        call(True)
    assert len(cache.layers) == 0


def test_absurd_layer_idx_fails_at_once():
    cache = DynamicCache()
    start = time.perf_counter()
    with pytest.raises(IndexError, match=rf"MAX_LAZY_LAYERS = {sc.MAX_LAZY_LAYERS}.*got 1000000000"):
        cache.state_update(torch.ones(1), 10**9)
    with pytest.raises(IndexError, match="MAX_LAZY_LAYERS"):
        cache.update(*kv(), 10**9, {"recurrent_state": torch.ones(1)})
    assert time.perf_counter() - start < 0.5 and len(cache.layers) == 0
    # reads of a far layer are harmless: no state there
    assert cache.get_recurrent_state(10**9) is None


# ------------------------------------------------------------------------------------------------ hack / unhack


def test_hack_is_idempotent_and_unhack_restores_every_class_dict_exactly():
    was = sc.is_hacked()
    unhack_kv_cache_recurrent_state()
    try:
        before = snapshot()
        assert not hasattr(cu.DynamicLayer, "state_update") and not hasattr(cu.Cache, "state_update")
        unhack_kv_cache_recurrent_state()  # without hack: nothing happens
        assert_same_dicts(before, snapshot())
        hack_kv_cache_recurrent_state()
        once = snapshot()
        hack_kv_cache_recurrent_state()
        assert_same_dicts(once, snapshot())  # a second hack wraps nothing twice
        # inherited methods are not written onto subclasses
        assert "batch_repeat_interleave" not in cu.DynamicSlidingWindowLayer.__dict__
        assert "state_update" not in cu.DynamicLayer.__dict__
        unhack_kv_cache_recurrent_state()
        assert_same_dicts(before, snapshot())
        if NATIVE is not None:
            assert "get_recurrent_state" in cu.Cache.__dict__  # transformers' own method is back
            assert cu.Cache.__dict__["get_recurrent_state"] is before[cu.Cache]["get_recurrent_state"]
    finally:
        if was:
            hack_kv_cache_recurrent_state()


def test_patch_applies_to_caches_created_before_the_hack():
    was = sc.is_hacked()
    unhack_kv_cache_recurrent_state()
    try:
        cache = DynamicCache()
        cache.update(*kv(T=4), 0)
        layer = cu.DynamicSlidingWindowLayer(sliding_window=4)
        hack_kv_cache_recurrent_state()
        s = torch.ones(2, 1)
        cache.state_update(s, 1, {"num_new_tokens": 4})
        assert cache.get_recurrent_state(1) is s and cache.layers[0].recurrent_state_initialized is False
        cache.reorder_cache(torch.tensor([1, 1]))
        assert cache.get_recurrent_state(1).shape == (2, 1)
        assert layer.recurrent_state_initialized is False and layer.get_recurrent_state() is None
    finally:
        if not was:
            unhack_kv_cache_recurrent_state()


def test_hack_and_unhack_from_many_threads():
    was = sc.is_hacked()
    unhack_kv_cache_recurrent_state()
    before = snapshot()
    errors = []
    barrier = threading.Barrier(8)

    def worker(i):
        try:
            barrier.wait()
            for j in range(30):
                (hack_kv_cache_recurrent_state if (i + j) % 3 else unhack_kv_cache_recurrent_state)()
            hack_kv_cache_recurrent_state()
        except Exception as err:  # noqa: BLE001 - reported below
            errors.append(err)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    try:
        assert not errors
        # every thread ended with a hack: the patch is whole
        assert sc.is_hacked() and callable(cu.DynamicLayer.state_update)
        cache = DynamicCache()
        cache.state_update(torch.ones(1), 0, {"num_new_tokens": 1})
        assert cache.get_seq_length() == 1
        unhack_kv_cache_recurrent_state()
        assert_same_dicts(before, snapshot())
    finally:
        if was:
            hack_kv_cache_recurrent_state()


# ------------------------------------------------------------------------------------------------ native layers


def native_config():
    # Llama has no layer_types of its own; setting them makes DynamicCache build native linear layers
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=32,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        layer_types=["linear_attention", "full_attention"],
    )


@needs_native
def test_native_layer_slot_0_is_the_swaa_state_in_one_static_buffer():
    cache = DynamicCache(config=native_config())
    layer = cache.layers[0]
    assert type(layer) is cu.LinearAttentionLayer and layer.recurrent_state_initialized is False
    x = torch.randn(2, 2, 4, 4)
    x_copy = x.clone()
    stored = cache.state_update(x, 0, {"num_new_tokens": 3})
    # a buffer of its own (the caller keeps its tensor), static for compiled decode, in slot 0
    assert stored is not x and torch.equal(stored, x) and layer.recurrent_states[0] is stored
    assert getattr(stored, "_dynamo_static_input_type", None) == "unguarded"
    assert layer.has_previous_state[0] and cache.has_previous_state(0)
    assert cache.get_recurrent_state(0) is stored and cache.get_recurrent_state(0, state_idx=0) is stored
    assert layer.recurrent_state_initialized is True
    ptr = stored.data_ptr()
    # a native write of the same layout lands in the same buffer, and the swaa API reads it
    y = torch.randn(2, 2, 4, 4)
    cache.update_recurrent_state(y, 0)
    assert torch.equal(layer.state_update(None), y) and layer.recurrent_states[0].data_ptr() == ptr
    assert torch.equal(x, x_copy)
    # transformers refuses get_seq_length(i) on a native layer; one that counted tokens answers with its count
    cache.update(*kv(T=3), 1)
    assert cache.get_seq_length(0) == 3 and cache.get_seq_length(1) == 3
    # reset zeroes the buffer in place: no state until the next write, which reuses the buffer
    cache.reset()
    assert cache.get_recurrent_state(0) is None and not cache.is_recurrent_state_initialized(0)
    assert layer.recurrent_state_initialized is False and torch.equal(x, x_copy)
    assert layer.recurrent_states[0].data_ptr() == ptr and not layer.recurrent_states[0].any()
    assert cache.state_update(x, 0).data_ptr() == ptr and torch.equal(cache.get_recurrent_state(0), x)
    # a state of another layout (a tuple here) gets new buffers; a native write then gets its own buffer
    pair = (torch.randn(2, 2, 4, 4), torch.randn(2, 2, 4))
    got = cache.state_update(pair, 0)
    assert isinstance(got, tuple) and all(torch.equal(a, b) and a is not b for a, b in zip(got, pair))
    cache.update_recurrent_state(y, 0)
    assert torch.equal(cache.get_recurrent_state(0), y) and all(torch.equal(a, b) for a, b in zip(got, pair))


@needs_native
def test_native_layers_carry_tuple_states_through_batch_ops_and_other_slots_stay_native():
    config = native_config()
    config.number_of_conv_states = 2
    cache = DynamicCache(config=config)
    layer = cache.layers[0]
    assert layer.number_of_states == 2
    state = (torch.arange(3.0).reshape(3, 1), torch.arange(3.0))
    cache.state_update(state, 0)
    native1 = torch.arange(3.0).reshape(3, 1, 1) * 10
    layer.update_recurrent_state(native1, state_idx=1)
    layer.has_previous_state[1] = True
    cache.update(*kv(B=3, T=2), 1)
    cache.reorder_cache(torch.tensor([2, 0, 1]))
    cache.batch_repeat_interleave(2)  # LinearAttentionLayer has none of its own: added by the patch
    cache.batch_select_indices(torch.tensor([0, 4]))
    want_rows = torch.tensor([2, 1])
    got = cache.get_recurrent_state(0)
    _assert_state_equal(got, (state[0][want_rows], state[1][want_rows]))
    assert torch.equal(cache.get_recurrent_state(0, state_idx=1), native1[want_rows])
    assert cache.layers[1].keys.shape[0] == 2


@needs_native
def test_native_hybrid_layer_moves_keys_and_state_once():
    layer = cu.LinearAttentionAndFullAttentionLayer()
    k, v = kv(B=3, T=2)
    layer.update(k, v)
    s = torch.arange(3.0)
    layer.state_update(s)
    layer.batch_repeat_interleave(2)
    assert torch.equal(layer.get_recurrent_state(), s.repeat_interleave(2))
    assert torch.equal(layer.keys, k.repeat_interleave(2, dim=0))
    layer.reorder_cache(torch.tensor([5, 0, 1, 2, 3, 4]))
    assert torch.equal(layer.get_recurrent_state(), s.repeat_interleave(2)[[5, 0, 1, 2, 3, 4]])


@needs_native
def test_native_other_state_idx_goes_to_transformers_and_plain_layers_refuse_it():
    cache = DynamicCache(config=native_config())
    assert cache.get_recurrent_state(0, state_idx=0) is None
    cache.update(*kv(), 1)
    with pytest.raises(ValueError, match="`state_idx` must be 0 or None for layer 1"):
        cache.get_recurrent_state(1, state_idx=1)
    # unhacked, transformers' own method answers (and refuses plain layers) again
    was = sc.is_hacked()
    unhack_kv_cache_recurrent_state()
    try:
        with pytest.raises(ValueError, match="non linear attention layer"):
            cache.get_recurrent_state(1)
    finally:
        if was:
            hack_kv_cache_recurrent_state()


# ------------------------------------------------------------------------------------------------ docs


def test_module_docstring_example_runs():
    doc = sc.__doc__
    example = doc[doc.index("Example::") + len("Example::") :]  # the example closes the docstring
    lines = [line[4:] for line in example.splitlines() if line.strip()]
    exec(compile("\n".join(lines), "swaa.cache docstring", "exec"), {})
    hack_kv_cache_recurrent_state()  # the example ends with an unhack; the fixture expects the patch
