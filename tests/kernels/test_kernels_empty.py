"""Empty inputs (issue 11 item 4): a batch of zero sequences or zero tokens returns correctly shaped
empty outputs and the state it was given (zeros when none), on every path and for both operations."""

import pytest
import torch

from swaa.kernels import decode_step_, gla, linear_attn

# (name, call): GLA, linear attention, normalized linear attention
OPS = {
    "gla": lambda q, k, v, g, **kw: gla(q, k, v, g, **kw),
    "linear": lambda q, k, v, g, **kw: linear_attn(q, k, v, **kw),
    "normalized": lambda q, k, v, g, **kw: linear_attn(q, k, v, normalize=True, **kw),
}


def inputs(B, T, H=2, K=4, V=3, dtype=torch.float32):
    gen = torch.Generator().manual_seed(0)
    q, k = (torch.randn(B, T, H, K, generator=gen, dtype=dtype) for _ in range(2))
    v = torch.randn(B, T, H, V, generator=gen, dtype=dtype)
    g = -torch.rand(B, T, H, K, generator=gen, dtype=dtype)
    return q, k, v, g


def state(op, B, H=2, K=4, V=3):
    gen = torch.Generator().manual_seed(1)
    S = torch.randn(B, H, K, V, generator=gen)
    return (S, torch.rand(B, H, K, generator=gen)) if op == "normalized" else S


def as_tuple(s):
    return s if isinstance(s, tuple) else (s,)


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("B, T", [(0, 5), (0, 1), (0, 0), (3, 0)])
@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_empty_inputs_give_empty_outputs_and_the_state_they_were_given(op, B, T, backend):
    q, k, v, g = inputs(B, T)
    o, final = OPS[op](q, k, v, g, output_final_state=True, backend=backend)
    assert o.shape == (B, T, 2, 3) and o.dtype == v.dtype
    expected_shapes = [(B, 2, 4, 3), (B, 2, 4)] if op == "normalized" else [(B, 2, 4, 3)]
    assert [tuple(s.shape) for s in as_tuple(final)] == expected_shapes
    assert all(s.dtype == torch.float32 and not s.any() for s in as_tuple(final))
    # a given state passes through unchanged, and can be handed to the next call
    h0 = state(op, B)
    o, final = OPS[op](q, k, v, g, initial_state=h0, output_final_state=True, backend=backend)
    assert all(torch.equal(a, b) for a, b in zip(as_tuple(final), as_tuple(h0)))
    q1, k1, v1, g1 = inputs(B, 2)
    o1, _ = OPS[op](q1, k1, v1, g1, initial_state=final, output_final_state=True, backend=backend)
    assert o1.shape == (B, 2, 2, 3)
    o, final = OPS[op](q, k, v, g, backend=backend)
    assert final is None and o.shape == (B, T, 2, 3)


@pytest.mark.parametrize("gated", [True, False])
def test_an_empty_batch_decode_step_leaves_the_empty_state(gated):
    q, k, v, g = inputs(0, 1)
    S = torch.zeros(0, 2, 4, 3)
    o = decode_step_(q, k, v, g if gated else None, state=S)
    assert o.shape == (0, 1, 2, 3) and S.shape == (0, 2, 4, 3)


def test_an_empty_batch_with_backend_fla_off_cuda_still_says_why():
    q, k, v, g = inputs(0, 5)
    with pytest.raises(ValueError, match="backend='fla' needs CUDA tensors"):
        gla(q, k, v, g, backend="fla")
