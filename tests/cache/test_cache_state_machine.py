"""Property-based test of the cache patch: random sequences of cache operations against a plain-Python model.

The model keeps, per layer, the rows of the keys (batch-major lists), the rows of the recurrent state (a
tensor `[B, 2]` or a tuple `([B, 2], [B])`) and the absorbed-token count; every rule applies an operation to
both, and the invariant compares them after each step.
"""

import copy

import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule
from transformers import DynamicCache
from transformers import cache_utils as cu

import swaa.cache as sc

LAYERS = 3
MAX_BATCH = 8


def _reset_drops_keys() -> bool:
    # 5.x drops the keys of a reset DynamicLayer, 4.57 zeroes them in place
    layer = cu.DynamicLayer()
    layer.update(torch.ones(1, 1, 1, 1), torch.ones(1, 1, 1, 1))
    layer.reset()
    return layer.keys is None


RESET_DROPS_KEYS = _reset_drops_keys()


def _rows(state):
    """A state as plain Python: per batch row, a tuple of its values."""
    if isinstance(state, tuple):
        return [tuple(a) + (b,) for a, b in zip(state[0].tolist(), state[1].tolist())]
    return [tuple(r) for r in state.tolist()]


class CacheMachine(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.was_hacked = sc.is_hacked()
        sc.hack_kv_cache_recurrent_state()
        self.cache = DynamicCache()
        self.batch = 2
        self.next_value = 0
        # model, per layer: keys rows (None = no keys), state rows (None = no state), is_tuple, count
        self.keys = [None] * LAYERS
        self.state = [None] * LAYERS
        self.is_tuple = [False] * LAYERS
        self.count = [0] * LAYERS

    def teardown(self):
        if not self.was_hacked:
            sc.unhack_kv_cache_recurrent_state()

    def _fresh(self, *shape):
        n = 1
        for s in shape:
            n *= s
        out = torch.arange(self.next_value, self.next_value + n, dtype=torch.float64).reshape(shape)
        self.next_value += n
        return out

    def _new_state(self, as_tuple):
        if as_tuple:
            return (self._fresh(self.batch, 2), self._fresh(self.batch))
        return self._fresh(self.batch, 2)

    def _record_state(self, layer, state, n):
        self.state[layer] = _rows(state)
        self.is_tuple[layer] = isinstance(state, tuple)
        self.count[layer] += n

    def _map_rows(self, fn):
        for i in range(LAYERS):
            if self.keys[i] is not None:
                self.keys[i] = fn(self.keys[i])
            if self.state[i] is not None:
                self.state[i] = fn(self.state[i])

    @rule(
        layer=st.integers(0, LAYERS - 1),
        tokens=st.integers(1, 3),
        with_state=st.booleans(),
        as_tuple=st.booleans(),
        n=st.integers(0, 3),
    )
    def kv_update(self, layer, tokens, with_state, as_tuple, n):
        k = self._fresh(self.batch, 1, tokens, 1)
        ck = None
        if with_state:
            state = self._new_state(as_tuple)
            ck = {"recurrent_state": state, "num_new_tokens": n}
        self.cache.update(k, -k, layer, ck)
        new_rows = [row for row in k[:, 0, :, 0].tolist()]
        old = self.keys[layer] or [[] for _ in range(self.batch)]
        self.keys[layer] = [a + b for a, b in zip(old, new_rows)]
        if with_state:
            assert self.cache.get_recurrent_state(layer) is state
            self._record_state(layer, state, n)

    @rule(layer=st.integers(0, LAYERS - 1), as_tuple=st.booleans(), n=st.integers(0, 4))
    def state_update(self, layer, as_tuple, n):
        state = self._new_state(as_tuple)
        assert self.cache.state_update(state, layer, {"num_new_tokens": n}) is state
        assert self.cache.state_update(None, layer) is state
        self._record_state(layer, state, n)

    @rule(data=st.data())
    def reorder(self, data):
        beam = data.draw(st.lists(st.integers(0, self.batch - 1), min_size=self.batch, max_size=self.batch))
        self.cache.reorder_cache(torch.tensor(beam))
        self._map_rows(lambda rows: [rows[b] for b in beam])

    @precondition(lambda self: self.batch * 2 <= MAX_BATCH)
    @rule(repeats=st.integers(1, 2))
    def repeat(self, repeats):
        self.cache.batch_repeat_interleave(repeats)
        self._map_rows(lambda rows: [r for r in rows for _ in range(repeats)])
        self.batch *= repeats

    @rule(data=st.data())
    def select(self, data):
        idx = data.draw(st.lists(st.integers(0, self.batch - 1), min_size=1, max_size=self.batch))
        self.cache.batch_select_indices(torch.tensor(idx))
        self._map_rows(lambda rows: [rows[i] for i in idx])
        self.batch = len(idx)

    @rule()
    def deepcopy(self):
        before = [self.cache.get_recurrent_state(i) for i in range(LAYERS)]
        self.cache = copy.deepcopy(self.cache)
        for i, old in enumerate(before):
            new = self.cache.get_recurrent_state(i)
            assert (old is None) == (new is None)
            if old is not None:
                assert new is not old

    @rule()
    def reset(self):
        self.cache.reset()
        for i in range(LAYERS):
            self.state[i] = None
            self.count[i] = 0
            if self.keys[i] is not None:
                self.keys[i] = None if RESET_DROPS_KEYS else [[0.0] * len(r) for r in self.keys[i]]

    # without past recording a state rolls back to no token or to all of them only (tests/cache/test_rollback.py
    # covers recording): one token off a layer that absorbed two or more is refused, and nothing changes
    @precondition(lambda self: any(s is not None and n >= 2 for s, n in zip(self.state, self.count)))
    @rule()
    def crop_is_refused(self):
        try:
            self.cache.crop(-1)
        except RuntimeError as err:
            assert "cannot be rolled back" in str(err)
        else:
            raise AssertionError("crop of a cache holding a recurrent state did not raise")

    @invariant()
    def matches_model(self):
        layers = self.cache.layers
        for i in range(LAYERS):
            got = self.cache.get_recurrent_state(i)
            if self.state[i] is None:
                assert got is None and not self.cache.is_recurrent_state_initialized(i)
            else:
                assert self.cache.is_recurrent_state_initialized(i)
                assert isinstance(got, tuple) == self.is_tuple[i]
                assert _rows(got) == self.state[i]
            keys = layers[i].keys if i < len(layers) else None
            if self.keys[i] is None:
                assert keys is None or keys.numel() == 0
                expected_len = self.count[i]
            else:
                assert keys[:, 0, :, 0].tolist() == self.keys[i]
                expected_len = len(self.keys[i][0])
            if i < len(layers):
                assert layers[i].get_seq_length() == expected_len
            assert self.cache.get_seq_length(i) == (expected_len if i < len(layers) else 0)


CacheMachine.TestCase.settings = settings(
    max_examples=120, stateful_step_count=30, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
TestCacheMachine = CacheMachine.TestCase
