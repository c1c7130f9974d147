"""The cache patch inside real forward passes: a custom linear-attention module and tiny Qwen3 models."""

import copy

import pytest
import torch
from torch import nn
from transformers import DynamicCache, Qwen3Config, Qwen3ForCausalLM

import swaa.cache as sc
from swaa.layers.host_inputs import cache_argument

CACHE_ARG = cache_argument(Qwen3ForCausalLM)


@pytest.fixture(autouse=True)
def hacked():
    was = sc.is_hacked()
    sc.hack_kv_cache_recurrent_state()
    yield
    if not was:
        sc.unhack_kv_cache_recurrent_state()


def tiny_qwen3(seed=0, layers=3):
    config = Qwen3Config(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=128,
        attn_implementation="eager",
    )
    torch.manual_seed(seed)
    return Qwen3ForCausalLM(config).eval()


def forward(model, ids, cache):
    return model(input_ids=ids, use_cache=True, **{CACHE_ARG: cache}).logits


class ToyLinearAttention(nn.Module):
    """Unnormalized causal linear attention S_t = S_{t-1} + k_t^T v_t, o_t = q_t S_t, reading and writing
    its state only through `cache.state_update`."""

    def __init__(self, dim=6, layer_idx=1):
        super().__init__()
        self.layer_idx = layer_idx
        self.q = nn.Linear(dim, dim, bias=False, dtype=torch.float64)
        self.k = nn.Linear(dim, dim, bias=False, dtype=torch.float64)
        self.v = nn.Linear(dim, dim, bias=False, dtype=torch.float64)

    def forward(self, x, cache):  # x [B, T, D]
        q, k, v = self.q(x), self.k(x), self.v(x)
        state = cache.state_update(None, self.layer_idx)  # [B, D, D] or None
        if state is None:
            state = x.new_zeros(x.shape[0], x.shape[-1], x.shape[-1])
        outs = []
        for t in range(x.shape[1]):
            state = state + k[:, t, :, None] * v[:, t, None, :]
            outs.append(torch.einsum("bd,bde->be", q[:, t], state))
        cache.state_update(state, self.layer_idx, {"num_new_tokens": x.shape[1]})
        return torch.stack(outs, dim=1)


def test_custom_linear_attention_chunked_equals_one_pass():
    torch.manual_seed(0)
    module = ToyLinearAttention()
    x = torch.randn(2, 15, 6, dtype=torch.float64)
    whole = DynamicCache()
    out_whole = module(x, whole)
    chunked = DynamicCache()
    out_a = module(x[:, :10], chunked)
    state_10 = chunked.get_recurrent_state(1)
    out_b = module(x[:, 10:], chunked)
    torch.testing.assert_close(
        chunked.get_recurrent_state(1), whole.get_recurrent_state(1), rtol=1e-12, atol=1e-12
    )
    torch.testing.assert_close(torch.cat([out_a, out_b], 1), out_whole, rtol=1e-12, atol=1e-12)
    # the second chunk started from the first chunk's state, not from zeros
    assert not torch.allclose(state_10, chunked.get_recurrent_state(1))
    assert chunked.get_seq_length(1) == whole.get_seq_length(1) == 15
    assert not chunked.is_recurrent_state_initialized(0)


def test_tiny_qwen3_state_on_layer_0_is_untouched_by_decoding():
    model = tiny_qwen3()
    cache = DynamicCache()
    ids = torch.randint(0, 64, (2, 5), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        forward(model, ids, cache)
        assert cache.layers[0].keys.shape[-2] == 5
        state = (torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8))
        snapshot = tuple(t.clone() for t in state)
        cache.state_update(state, 0)
        forward(model, ids[:, :1], cache)
    assert cache.layers[0].keys.shape[-2] == 6 and cache.get_seq_length() == 6
    assert cache.get_recurrent_state(0) is state
    assert all(torch.equal(a, b) for a, b in zip(state, snapshot))
    assert (
        not cache.is_recurrent_state_initialized(1) and cache.layers[1].recurrent_state_initialized is False
    )


class StateOnlyLayer0(nn.Module):
    """Stands in for layer 0's attention: contributes nothing to the residual stream, keeps a state in the
    cache (the running sum of its inputs) and, if `count_tokens`, tells the cache how many positions it
    absorbed. Positions and masks of the model then depend on that count alone."""

    def __init__(self, count_tokens=True):
        super().__init__()
        self.count_tokens = count_tokens

    def forward(self, hidden_states, **kwargs):
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        prev = cache.get_recurrent_state(0)
        new = hidden_states.sum(1) + (0 if prev is None else prev)  # [B, D]
        ck = {"num_new_tokens": hidden_states.shape[1]} if self.count_tokens else None
        cache.state_update(new, 0, ck)
        return torch.zeros_like(hidden_states), None


def _run_steps(model, chunks):
    cache = DynamicCache()
    logits, lengths = [], []
    with torch.no_grad():
        for ids in chunks:
            logits.append(forward(model, ids, cache))
            lengths.append(cache.get_seq_length())
    return logits, lengths, cache


def test_state_only_layer_0_keeps_positions_and_masks_of_a_direct_forward():
    # reference: nothing patched in the model, layer 0 a standard attention whose output projection is zero,
    # so layer 0 adds nothing to the residual stream but its keys give the cache its length
    ref = tiny_qwen3(seed=1)
    with torch.no_grad():
        ref.model.layers[0].self_attn.o_proj.weight.zero_()
    hybrid = copy.deepcopy(ref)
    hybrid.model.layers[0].self_attn = StateOnlyLayer0()
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(2))
    # prefill 7, a 3-token chunk (a real mask against 7 cached keys), then two single-token decode steps
    chunks = [ids[:, :7], ids[:, 7:10], ids[:, 10:11], ids[:, 11:12]]
    ref_logits, ref_lengths, _ = _run_steps(ref, chunks)
    hyb_logits, hyb_lengths, cache = _run_steps(hybrid, chunks)
    assert ref_lengths == hyb_lengths == [7, 10, 11, 12]
    assert cache.layers[0].keys is None and cache.get_recurrent_state(0).shape == (2, 32)
    for want, got in zip(ref_logits, hyb_logits):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)

    # the comparison is sensitive: without the token count, positions restart at 0 and the logits move
    uncounted = copy.deepcopy(ref)
    uncounted.model.layers[0].self_attn = StateOnlyLayer0(count_tokens=False)
    decode = [ids[:, :7], ids[:, 7:8], ids[:, 8:9]]
    bad_logits, bad_lengths, _ = _run_steps(uncounted, decode)
    ref_logits, _, _ = _run_steps(ref, decode)
    assert bad_lengths == [0, 0, 0]
    torch.testing.assert_close(bad_logits[0], ref_logits[0], rtol=1e-5, atol=1e-5)  # prefill needs no past
    for want, got in zip(ref_logits[1:], bad_logits[1:]):
        assert not torch.allclose(got, want, rtol=1e-3, atol=1e-3)
    # and a chunk against cached keys gets a mask of the wrong size
    with pytest.raises(RuntimeError, match="size"):
        _run_steps(uncounted, chunks)


class PrefixSumMixer(nn.Module):
    """A causal 'linear attention' for layer 0 whose output depends on the whole prefix through a state:
    o_t = W (x_1 + ... + x_t) / t. With a cache it resumes from the stored running sum; without one
    (use_cache=False) it recomputes the prefix, which makes it its own reference."""

    def __init__(self, dim):
        super().__init__()
        self.w = nn.Linear(dim, dim, bias=False)

    def forward(self, hidden_states, **kwargs):
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        B, T, D = hidden_states.shape
        prev = cache.get_recurrent_state(0) if cache is not None else None
        prev_sum, prev_len = (
            (hidden_states.new_zeros(B, D), 0) if prev is None else (prev, cache.get_seq_length(0))
        )
        sums = prev_sum[:, None] + hidden_states.cumsum(1)  # [B, T, D]
        if cache is not None:
            cache.state_update(sums[:, -1], 0, {"num_new_tokens": T})
        steps = torch.arange(prev_len + 1, prev_len + T + 1, dtype=hidden_states.dtype)
        return self.w(sums / steps[None, :, None]), None


def _beam_search(model, ids, use_cache):
    return model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        num_beams=3,
        num_return_sequences=3,
        max_new_tokens=6,
        do_sample=False,
        use_cache=use_cache,
        output_scores=True,
        return_dict_in_generate=True,
        pad_token_id=0,
    )


def test_beam_search_with_a_recurrent_layer_0_matches_recomputing_without_cache(monkeypatch):
    model = tiny_qwen3(seed=3)
    model.generation_config.eos_token_id = None
    model.model.layers[0].self_attn = PrefixSumMixer(model.config.hidden_size)
    torch.manual_seed(4)
    ids = torch.randint(1, 64, (2, 5))
    with torch.no_grad():
        ref = _beam_search(model, ids, use_cache=False)
        out = _beam_search(model, ids, use_cache=True)
        assert torch.equal(out.sequences, ref.sequences)
        torch.testing.assert_close(out.sequences_scores, ref.sequences_scores, rtol=1e-5, atol=1e-5)
        # without the state following `reorder_cache`, beam search goes silently wrong
        monkeypatch.setitem(sc._BATCH_FNS, "reorder_cache", lambda layer, beam_idx: lambda t: t)
        broken = _beam_search(model, ids, use_cache=True)
    assert not torch.equal(broken.sequences, ref.sequences) or not torch.allclose(
        broken.sequences_scores, ref.sequences_scores, rtol=1e-5, atol=1e-5
    )
