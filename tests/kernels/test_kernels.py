"""CPU tests of swaa.kernels: the torch chunked and single-step paths against the float64 oracles,
state carrying, packed sequences, gradients, dtypes, strong gates, the in-place decode step,
compiled decode, and what the package imports."""

import ast
import pathlib
import subprocess
import sys
import types

import pytest
import torch
import torch.nn.functional as F
from torch._dynamo.testing import CompileCounterWithBackend

from swaa.kernels import (
    decode_step_,
    fla_available,
    fla_rms_norm_gated,
    gla,
    linear_attn,
    naive_gla,
    naive_linear_attn,
)
from swaa.kernels.gla import chunk_gla_torch

F64 = torch.float64
# the module, not the function the package exports under the same name
GLA_MODULE = sys.modules["swaa.kernels.gla"]


def rel(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def make(B, T, H, K, V, dtype=F64, seed=0, gate_scale=1.0, positive=False):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, H, K, generator=gen, dtype=F64)
    k = torch.randn(B, T, H, K, generator=gen, dtype=F64)
    v = torch.randn(B, T, H, V, generator=gen, dtype=F64)
    g = F.logsigmoid(torch.randn(B, T, H, K, generator=gen, dtype=F64)) * gate_scale
    if positive:  # normalized linear attention is meant for non-negative feature maps
        q, k = F.elu(q) + 1, F.elu(k) + 1
    h0 = torch.randn(B, H, K, V, generator=gen, dtype=F64)
    z0 = torch.rand(B, H, K, generator=gen, dtype=F64) + 0.5
    q, k, v, g = (x.to(dtype) for x in (q, k, v, g))
    return q, k, v, g, h0.to(torch.float32 if dtype != F64 else F64), z0


SIZES = [
    pytest.param(2, 1, 2, 8, 8, id="T1"),
    pytest.param(1, 63, 2, 16, 16, id="T63"),
    pytest.param(2, 64, 2, 16, 16, id="T64"),
    pytest.param(1, 65, 3, 16, 16, id="T65"),
    pytest.param(2, 300, 2, 16, 16, id="T300"),
    pytest.param(1, 130, 2, 16, 24, id="K!=V"),
    pytest.param(1, 97, 2, 60, 20, id="K60"),
]


@pytest.mark.parametrize("B,T,H,K,V", SIZES)
@pytest.mark.parametrize("with_h0", [False, True], ids=["h0=None", "h0"])
def test_gla_matches_oracle_float64(B, T, H, K, V, with_h0):
    q, k, v, g, h0, _ = make(B, T, H, K, V)
    h0 = h0 if with_h0 else None
    o_ref, S_ref = naive_gla(q, k, v, g, initial_state=h0, output_final_state=True)
    o, S = gla(q, k, v, g, initial_state=h0, output_final_state=True)
    assert o.dtype == F64 and S.dtype == F64 and S.shape == (B, H, K, V)
    assert rel(o, o_ref) < 1e-10
    assert rel(S, S_ref) < 1e-10


@pytest.mark.parametrize("B,T,H,K,V", SIZES)
@pytest.mark.parametrize("with_h0", [False, True], ids=["h0=None", "h0"])
@pytest.mark.parametrize("normalize", [False, True], ids=["plain", "normalized"])
def test_linear_attn_matches_oracle_float64(B, T, H, K, V, with_h0, normalize):
    q, k, v, _, h0, z0 = make(B, T, H, K, V, positive=normalize)
    state = None
    if with_h0:
        state = (h0, z0) if normalize else h0
    o_ref, S_ref = naive_linear_attn(
        q, k, v, initial_state=state, output_final_state=True, normalize=normalize
    )
    o, S = linear_attn(q, k, v, initial_state=state, output_final_state=True, normalize=normalize)
    assert o.dtype == F64
    assert rel(o, o_ref) < 1e-10
    if normalize:
        assert isinstance(S, tuple) and S[0].shape == (B, H, K, V) and S[1].shape == (B, H, K)
        assert rel(S[0], S_ref[0]) < 1e-10 and rel(S[1], S_ref[1]) < 1e-10
    else:
        assert rel(S, S_ref) < 1e-10


def test_output_final_state_false_returns_none_and_no_initial_state_is_zeros():
    q, k, v, g, h0, _ = make(1, 20, 2, 8, 8)
    o, S = gla(q, k, v, g)
    assert S is None
    o0, _ = gla(q, k, v, g, initial_state=torch.zeros_like(h0))
    assert rel(o, o0) < 1e-12


@pytest.mark.parametrize("split", [1, 37, 64, 99])
def test_gla_split_and_carry_equals_one_pass(split):
    q, k, v, g, h0, _ = make(2, 150, 2, 16, 8)
    o_full, S_full = gla(q, k, v, g, initial_state=h0, output_final_state=True)
    o1, S1 = gla(
        q[:, :split], k[:, :split], v[:, :split], g[:, :split], initial_state=h0, output_final_state=True
    )
    o2, S2 = gla(
        q[:, split:], k[:, split:], v[:, split:], g[:, split:], initial_state=S1, output_final_state=True
    )
    assert rel(torch.cat([o1, o2], 1), o_full) < 1e-10
    assert rel(S2, S_full) < 1e-10


@pytest.mark.parametrize("normalize", [False, True])
def test_linear_attn_split_and_carry_equals_one_pass(normalize):
    q, k, v, _, h0, z0 = make(2, 150, 2, 16, 8, positive=True)
    state = (h0, z0) if normalize else h0
    o_full, S_full = linear_attn(q, k, v, initial_state=state, output_final_state=True, normalize=normalize)
    o1, S1 = linear_attn(
        q[:, :70], k[:, :70], v[:, :70], initial_state=state, output_final_state=True, normalize=normalize
    )
    o2, S2 = linear_attn(
        q[:, 70:], k[:, 70:], v[:, 70:], initial_state=S1, output_final_state=True, normalize=normalize
    )
    assert rel(torch.cat([o1, o2], 1), o_full) < 1e-10
    if normalize:
        assert rel(S2[0], S_full[0]) < 1e-10 and rel(S2[1], S_full[1]) < 1e-10
    else:
        assert rel(S2, S_full) < 1e-10


def test_token_by_token_decode_equals_prefill():
    # the generation round trip: prefill a prompt, then feed tokens one at a time (T == 1 path)
    q, k, v, g, h0, _ = make(3, 40, 2, 8, 8)
    o_full, S_full = gla(q, k, v, g, output_final_state=True)
    o, S = gla(q[:, :30], k[:, :30], v[:, :30], g[:, :30], output_final_state=True)
    outs = [o]
    for t in range(30, 40):
        o_t, S = gla(
            q[:, t : t + 1],
            k[:, t : t + 1],
            v[:, t : t + 1],
            g[:, t : t + 1],
            initial_state=S,
            output_final_state=True,
        )
        outs.append(o_t)
    assert rel(torch.cat(outs, 1), o_full) < 1e-10 and rel(S, S_full) < 1e-10


LENS = [[5, 70, 0, 1, 33], [64], [1, 1, 1]]


@pytest.mark.parametrize("lens", LENS, ids=["mixed+empty", "one", "ones"])
def test_gla_cu_seqlens_equals_separate_runs(lens):
    T = sum(lens)
    q, k, v, g, _, _ = make(1, T, 2, 8, 12)
    h0 = torch.randn(len(lens), 2, 8, 12, dtype=F64)
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()])
    o, S = gla(q, k, v, g, initial_state=h0, output_final_state=True, cu_seqlens=cu)
    o_ref, S_ref = naive_gla(q, k, v, g, initial_state=h0, output_final_state=True, cu_seqlens=cu)
    assert rel(o, o_ref) < 1e-10 and rel(S, S_ref) < 1e-10
    for n, (s, e) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
        o_n, S_n = gla(
            q[:, s:e], k[:, s:e], v[:, s:e], g[:, s:e], initial_state=h0[n : n + 1], output_final_state=True
        )
        if e > s:
            assert rel(o[:, s:e], o_n) < 1e-10
        assert rel(S[n : n + 1], S_n) < 1e-10


@pytest.mark.parametrize("normalize", [False, True])
def test_linear_attn_cu_seqlens_equals_separate_runs(normalize):
    lens = [7, 0, 66, 20]
    q, k, v, _, _, _ = make(1, sum(lens), 2, 8, 8, positive=True)
    h0 = torch.randn(len(lens), 2, 8, 8, dtype=F64)
    z0 = torch.rand(len(lens), 2, 8, dtype=F64) + 0.5
    state = (h0, z0) if normalize else h0
    cu = torch.tensor([0, 7, 7, 73, 93])
    o, S = linear_attn(
        q, k, v, initial_state=state, output_final_state=True, normalize=normalize, cu_seqlens=cu
    )
    for n, (s, e) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
        st = (h0[n : n + 1], z0[n : n + 1]) if normalize else h0[n : n + 1]
        o_n, S_n = linear_attn(
            q[:, s:e], k[:, s:e], v[:, s:e], initial_state=st, output_final_state=True, normalize=normalize
        )
        if e > s:
            assert rel(o[:, s:e], o_n) < 1e-10
        if normalize:
            assert rel(S[0][n : n + 1], S_n[0]) < 1e-10 and rel(S[1][n : n + 1], S_n[1]) < 1e-10
        else:
            assert rel(S[n : n + 1], S_n) < 1e-10


def test_left_padding_with_zeroed_k_and_g_leaves_state_untouched():
    # how layers handle padded batches: k = 0 and g = 0 at padding positions
    q, k, v, g, _, _ = make(1, 50, 2, 8, 8)
    pad = 13
    qp, kp, vp, gp = (torch.cat([torch.randn(1, pad, *x.shape[2:], dtype=F64), x], 1) for x in (q, k, v, g))
    kp[:, :pad] = 0
    gp[:, :pad] = 0
    o, S = gla(q, k, v, g, output_final_state=True)
    o_p, S_p = gla(qp, kp, vp, gp, output_final_state=True)
    assert rel(o_p[:, pad:], o) < 1e-10 and rel(S_p, S) < 1e-10


@pytest.mark.parametrize("T", [1, 6, 11])
def test_gla_gradcheck(T, monkeypatch):
    # a 4-token chunk makes T = 6 and 11 cross chunk boundaries (T = 1 is the single-step path)
    monkeypatch.setattr(GLA_MODULE, "CHUNK_SIZE", 4)
    q, k, v, g, h0, _ = make(2, T, 2, 3, 2)
    inputs = [x.clone().requires_grad_() for x in (q, k, v, g, h0)]

    def f(q, k, v, g, h0):
        return gla(q, k, v, g, initial_state=h0, output_final_state=True)

    assert torch.autograd.gradcheck(f, inputs)


@pytest.mark.parametrize("T", [1, 11])
@pytest.mark.parametrize("normalize", [False, True])
def test_linear_attn_gradcheck(T, normalize, monkeypatch):
    monkeypatch.setattr(GLA_MODULE, "CHUNK_SIZE", 4)
    q, k, v, _, h0, z0 = make(1, T, 2, 3, 2, positive=True)
    inputs = [x.clone().requires_grad_() for x in (q, k, v, h0, z0)]

    def f(q, k, v, h0, z0):
        o, S = linear_attn(
            q, k, v, initial_state=(h0, z0) if normalize else h0, output_final_state=True, normalize=normalize
        )
        return (o, *S) if normalize else (o, S)

    assert torch.autograd.gradcheck(f, inputs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("T", [1, 100])
def test_low_precision_inputs_keep_float32_state(dtype, T):
    q, k, v, g, h0, z0 = make(2, T, 2, 16, 8, dtype=dtype)
    o, S = gla(q, k, v, g, initial_state=h0, output_final_state=True)
    assert o.dtype == dtype and S.dtype == torch.float32
    o_ref, S_ref = naive_gla(
        *(x.double() for x in (q, k, v, g)), initial_state=h0.double(), output_final_state=True
    )
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert rel(o.double(), o_ref) < tol and rel(S.double(), S_ref) < 1e-5
    o, (S, z) = linear_attn(q, k, v, initial_state=(h0, z0.float()), output_final_state=True, normalize=True)
    assert o.dtype == dtype and S.dtype == torch.float32 and z.dtype == torch.float32


@pytest.mark.parametrize("gate", ["realistic", "strong"])
def test_gla_16k_tokens_stays_finite(gate):
    B, T, H, K = 1, 16384, 2, 16
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, T, H, K, generator=gen) for _ in range(3))
    x = torch.randn(B, T, H, K, generator=gen)
    # realistic: GLA's logsigmoid(x) / 16; strong: -20 per token (decay e^-20 every step)
    g = F.logsigmoid(x) / 16 if gate == "realistic" else torch.full_like(x, -20.0)
    o, S = gla(q, k, v, g, output_final_state=True)
    assert torch.isfinite(o).all() and torch.isfinite(S).all()
    if gate == "strong":
        # each token only sees itself: o_t = scale * (q_t . k_t) v_t
        expected = (q * k).sum(-1, keepdim=True) * v * K**-0.5
        assert rel(o, expected) < 1e-5


def test_strong_and_mixed_gates_match_oracle_float64():
    # gates from -20 to ~0 per step within each chunk: exact despite e^(CHUNK_SIZE * 20) spans
    q, k, v, g, h0, _ = make(1, 200, 2, 8, 8, seed=3)
    g = -torch.rand_like(g) * 20 * (torch.rand_like(g) > 0.5)
    o_ref, S_ref = naive_gla(q, k, v, g, initial_state=h0, output_final_state=True)
    o, S = chunk_gla_torch(q, k, v, g, 8**-0.5, h0, True)
    assert torch.isfinite(o).all()
    assert rel(o, o_ref) < 1e-10 and rel(S, S_ref) < 1e-10


def test_gradients_finite_with_strong_gates():
    q, k, v, g, h0, _ = make(1, 130, 2, 8, 8, dtype=torch.float32)
    g = torch.full_like(g, -30.0)
    xs = [x.clone().requires_grad_() for x in (q, k, v, g, h0)]
    o, S = gla(*xs[:4], initial_state=xs[4], output_final_state=True)
    (o.sum() + S.sum()).backward()
    assert all(torch.isfinite(x.grad).all() for x in xs)


def test_auto_and_torch_backends_agree_on_cpu():
    q, k, v, g, h0, _ = make(1, 70, 2, 8, 8)
    a = gla(q, k, v, g, initial_state=h0, output_final_state=True, backend="auto")
    b = gla(q, k, v, g, initial_state=h0, output_final_state=True, backend="torch")
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_custom_scale_applies_to_q():
    q, k, v, g, _, _ = make(1, 70, 2, 8, 8)
    o1, _ = gla(q, k, v, g, scale=1.0)
    o2, _ = gla(q * 0.3, k, v, g, scale=1.0)
    o3, _ = gla(q, k, v, g, scale=0.3)
    assert rel(o3, o2) < 1e-12 and rel(o3, 0.3 * o1) < 1e-12


@pytest.mark.parametrize("normalize", [False, True])
def test_segmented_runs_equal_the_oracle(normalize, monkeypatch):
    # long CPU inputs run in cache-sized segments with the state carried between them
    monkeypatch.setattr(GLA_MODULE, "SEGMENT_ELEMENTS", 64 * 2 * 16)  # 64-token segments here
    q, k, v, g, h0, z0 = make(1, 200, 2, 16, 8, positive=True)
    o, S = gla(q, k, v, g, initial_state=h0, output_final_state=True)
    o_ref, S_ref = naive_gla(q, k, v, g, initial_state=h0, output_final_state=True)
    assert rel(o, o_ref) < 1e-10 and rel(S, S_ref) < 1e-10
    state = (h0, z0) if normalize else h0
    o, S = linear_attn(q, k, v, initial_state=state, output_final_state=True, normalize=normalize)
    o_ref, S_ref = naive_linear_attn(
        q, k, v, initial_state=state, output_final_state=True, normalize=normalize
    )
    assert rel(o, o_ref) < 1e-10
    for a, b in zip(S if normalize else (S,), S_ref if normalize else (S_ref,)):
        assert rel(a, b) < 1e-10


@pytest.mark.parametrize("span_max", [-1.0, 30.0], ids=["products", "reference"])
def test_gla_both_chunk_forms_match_oracle_float64(span_max, monkeypatch):
    # on CPU, segments whose gates decay by at most e^-REFERENCE_SPAN_MAX per chunk take the plain
    # form (the chunk's start as reference), others the form built from products of gates:
    # span_max = -1 forces the latter everywhere; g / 16 (a few per chunk) takes the plain form
    monkeypatch.setattr(GLA_MODULE, "REFERENCE_SPAN_MAX", span_max)
    q, k, v, g, h0, _ = make(2, 150, 2, 16, 8)
    for gates in (g, g / 16):
        o_ref, S_ref = naive_gla(q, k, v, gates, initial_state=h0, output_final_state=True)
        o, S = chunk_gla_torch(q, k, v, gates, 16**-0.5, h0, True)
        assert rel(o, o_ref) < 1e-10 and rel(S, S_ref) < 1e-10
    inputs = [x[:1, :11].clone().requires_grad_() for x in (q, k, v, g)] + [h0[:1].clone().requires_grad_()]
    monkeypatch.setattr(GLA_MODULE, "CHUNK_SIZE", 4)
    assert torch.autograd.gradcheck(lambda q, k, v, g, h0: chunk_gla_torch(q, k, v, g, 0.5, h0, True), inputs)


def test_gla_with_and_without_autograd_give_identical_values():
    # without autograd the chunk states are written in place (out=); with it they are stacked
    q, k, v, g, h0, _ = make(1, 150, 2, 16, 8, dtype=torch.float32)
    with torch.no_grad():
        o, S = chunk_gla_torch(q, k, v, g, 0.25, h0, True)
    xs = [x.clone().requires_grad_() for x in (q, k, v, g, h0)]
    o_g, S_g = chunk_gla_torch(*xs[:4], 0.25, xs[4], True)
    assert o_g.requires_grad and torch.equal(o, o_g) and torch.equal(S, S_g)


def test_empty_input_returns_the_initial_state_or_zeros():
    q, k, v, g, h0, z0 = make(2, 0, 2, 8, 4)
    o, S = gla(q, k, v, g, output_final_state=True)
    assert o.shape == (2, 0, 2, 4) and S.shape == (2, 2, 8, 4) and not S.any()
    _, S = gla(q, k, v, g, initial_state=h0, output_final_state=True)
    assert torch.equal(S, h0)
    _, (S, z) = linear_attn(q, k, v, output_final_state=True, normalize=True)
    assert S.shape == (2, 2, 8, 4) and z.shape == (2, 2, 8) and not S.any() and not z.any()


def test_fake_tensors_skip_the_gate_value_check():
    # torch.export traces with fake tensors: their values are unknown, so the gate check must not read them
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        q, k, g = torch.randn(2, 1, 2, 8), torch.randn(2, 1, 2, 8), torch.ones(2, 1, 2, 8)
        v, h0 = torch.randn(2, 1, 2, 4), torch.randn(2, 2, 8, 4)
        o, S = gla(q, k, v, g, initial_state=h0, output_final_state=True)
    assert o.shape == (2, 1, 2, 4) and S.shape == (2, 2, 8, 4)


# (name, gated, normalize): the three single-token steps
STEPS = [
    pytest.param(True, False, id="gla"),
    pytest.param(False, False, id="linear_attn"),
    pytest.param(False, True, id="linear_attn-normalized"),
]


def _step_inputs(gated, normalize, dtype=torch.float32, seed=0, B=3, H=2, K=8, V=6):
    q, k, v, g, h0, z0 = make(B, 1, H, K, V, dtype=dtype, seed=seed, positive=normalize)
    state = (h0, z0.to(h0.dtype)) if normalize else h0
    return q, k, v, (g if gated else None), state


def _out_of_place(q, k, v, g, state, normalize, scale=None):
    if g is not None:
        return gla(q, k, v, g, scale=scale, initial_state=state, output_final_state=True)
    return linear_attn(
        q, k, v, scale=scale, initial_state=state, output_final_state=True, normalize=normalize
    )


def _parts(state):
    return list(state) if isinstance(state, tuple) else [state]


@pytest.mark.parametrize("gated,normalize", STEPS)
@pytest.mark.parametrize("dtype", [F64, torch.float32, torch.bfloat16], ids=["f64", "f32", "bf16"])
@pytest.mark.parametrize("scale", [None, 0.7], ids=["default-scale", "scale0.7"])
def test_decode_step_in_place_equals_out_of_place_step_and_oracle(gated, normalize, dtype, scale):
    q, k, v, g, state = _step_inputs(gated, normalize, dtype)
    buffers = tuple(s.clone() for s in _parts(state))
    ptrs = [b.data_ptr() for b in buffers]
    o = decode_step_(q, k, v, g, state=buffers if normalize else buffers[0], scale=scale, normalize=normalize)
    o_ref, S_ref = _out_of_place(q, k, v, g, state, normalize, scale)
    assert o.shape == (3, 1, 2, 6) and o.dtype == dtype
    assert [b.data_ptr() for b in buffers] == ptrs
    # the same torch step computes both, so in place and out of place agree to the bit
    assert torch.equal(o, o_ref)
    assert all(torch.equal(b, s) for b, s in zip(buffers, _parts(S_ref)))
    # the float64 oracle on the same (rounded) inputs
    args = [x.double() for x in (q, k, v)] + ([g.double()] if gated else [])
    state64 = tuple(s.double() for s in _parts(state))
    state64 = state64 if normalize else state64[0]
    if gated:
        o64, S64 = naive_gla(*args, scale=scale, initial_state=state64, output_final_state=True)
    else:
        o64, S64 = naive_linear_attn(
            *args, scale=scale, initial_state=state64, output_final_state=True, normalize=normalize
        )
    tol = {F64: 1e-12, torch.float32: 1e-6, torch.bfloat16: 1e-2}[dtype]
    assert rel(o.double(), o64) < tol
    assert all(rel(b.double(), s) < max(tol, 1e-6) for b, s in zip(buffers, _parts(S64)))


@pytest.mark.parametrize("gated,normalize", STEPS)
def test_decode_step_in_place_token_by_token_equals_prefill(gated, normalize):
    q, k, v, g, h0, z0 = make(2, 12, 2, 8, 8, positive=normalize)
    g = g if gated else None
    state = (h0.clone(), z0.clone()) if normalize else h0.clone()
    o_full, S_full = _out_of_place(q, k, v, g, (h0, z0) if normalize else h0, normalize)
    outs = []
    for t in range(12):
        tok = [None if x is None else x[:, t : t + 1] for x in (q, k, v, g)]
        outs.append(decode_step_(*tok, state=state, normalize=normalize))
    assert rel(torch.cat(outs, 1), o_full) < 1e-10
    assert all(rel(a, b) < 1e-10 for a, b in zip(_parts(state), _parts(S_full)))


def _compile(fn, backend="eager"):
    torch._dynamo.reset()
    counter = CompileCounterWithBackend(backend)
    return torch.compile(fn, backend=counter, fullgraph=True), counter


@pytest.mark.parametrize("gated,normalize", STEPS)
def test_compiled_single_token_call_has_no_graph_break_and_no_recompile(gated, normalize):
    # fullgraph=True raises on any graph break: a host sync or a branch on tensor values in the
    # checks or the dispatcher would fail here
    def step(q, k, v, g, state):
        return _out_of_place(q, k, v, g, state, normalize)

    compiled, counter = _compile(step)
    for seed in range(4):
        inputs = _step_inputs(gated, normalize, seed=seed)
        o_c, S_c = compiled(*inputs)
        o_e, S_e = step(*inputs)
        torch.testing.assert_close(o_c, o_e, rtol=1e-6, atol=1e-6)
        for a, b in zip(_parts(S_c), _parts(S_e)):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    assert counter.frame_count == 1


@pytest.mark.parametrize("gated,normalize", STEPS)
def test_compiled_in_place_decode_step_updates_the_state_buffer(gated, normalize):
    def step(q, k, v, g, state):
        return decode_step_(q, k, v, g, state=state, normalize=normalize)

    # aot_eager functionalizes the in-place update and writes the result back into the input
    compiled, counter = _compile(step, "aot_eager")
    for seed in range(3):
        q, k, v, g, state = _step_inputs(gated, normalize, seed=seed)
        buffers = tuple(s.clone() for s in _parts(state))
        ptrs = [b.data_ptr() for b in buffers]
        o_c = compiled(q, k, v, g, buffers if normalize else buffers[0])
        o_e, S_e = _out_of_place(q, k, v, g, state, normalize)
        assert [b.data_ptr() for b in buffers] == ptrs
        torch.testing.assert_close(o_c, o_e, rtol=1e-6, atol=1e-6)
        for a, b in zip(buffers, _parts(S_e)):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    assert counter.frame_count == 1


KERNELS_DIR = pathlib.Path(sys.modules["swaa.kernels"].__file__).parent


def test_kernels_import_no_transformers_and_fla_in_one_module():
    for path in sorted(KERNELS_DIR.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                assert top != "transformers", f"{path.name} imports {name}"
                if top == "swaa":
                    assert name == "swaa.validation" or name.startswith("swaa.kernels"), (
                        f"{path.name}: {name}"
                    )
                if top == "fla":
                    assert path.name == "fla_adapter.py", f"{path.name} imports {name}"


def test_import_swaa_kernels_loads_no_other_swaa_part_and_no_transformers():
    # the package root is bypassed (a bare namespace), so this measures swaa.kernels alone
    code = (
        "import sys, types; pkg = types.ModuleType('swaa'); pkg.__path__ = [sys.argv[1]]; "
        "sys.modules['swaa'] = pkg; import swaa.kernels; "
        "print(sorted(m for m in sys.modules if m.startswith(('swaa', 'transformers'))))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(KERNELS_DIR.parent)], capture_output=True, text=True, check=True
    ).stdout
    loaded = ast.literal_eval(out.strip().splitlines()[-1])
    assert not [m for m in loaded if m.startswith("transformers")]
    assert {m for m in loaded if not m.startswith("swaa.kernels")} == {"swaa", "swaa.validation"}


@pytest.fixture
def fresh_norm_accessor():
    fla_rms_norm_gated.cache_clear()
    yield fla_rms_norm_gated
    fla_rms_norm_gated.cache_clear()


def _fake_fla(monkeypatch, leaf):
    for name in ("fla", "fla.modules", "fla.modules.norm"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setitem(sys.modules, "fla.modules.norm.fused_norm_gate", leaf)


def test_fla_rms_norm_gated_returns_fla_function_once(fresh_norm_accessor, monkeypatch):
    leaf = types.ModuleType("fla.modules.norm.fused_norm_gate")
    leaf.rms_norm_gated = lambda *a, **kw: "fused"
    _fake_fla(monkeypatch, leaf)
    fn = fresh_norm_accessor()
    assert fn is leaf.rms_norm_gated
    monkeypatch.delitem(sys.modules, "fla.modules.norm.fused_norm_gate")
    assert fresh_norm_accessor() is fn  # cached: one import per process


def test_fla_rms_norm_gated_is_none_when_fla_is_missing_or_broken(fresh_norm_accessor, monkeypatch):
    if not fla_available():
        assert fresh_norm_accessor() is None
    fresh_norm_accessor.cache_clear()

    class Broken(types.ModuleType):
        # what an import of FLA's Triton modules does on a machine without a GPU driver
        def __getattr__(self, name):
            raise RuntimeError("0 active drivers ([]). There should only be one.")

    _fake_fla(monkeypatch, Broken("fla.modules.norm.fused_norm_gate"))
    assert fresh_norm_accessor() is None


@pytest.mark.parametrize("T", [1, 70], ids=["T1", "T70"])
@pytest.mark.parametrize("op", ["gla", "linear", "normalized"])
def test_torch_forms_under_bf16_autocast_compute_as_without_it(op, T):
    # training with `bf16=True` (Trainer's autocast) on CPU runs these forms: autocast must not cast their
    # float32 state arithmetic to bf16 (it once mixed dtypes in an in-place baddbmm_ and raised)
    # gentle gates: the chunked form takes its fast CPU branch (the one that raised)
    q, k, v, g, h0, z0 = make(
        2, T, 2, 8, 8, dtype=torch.bfloat16, gate_scale=0.05, positive=op == "normalized"
    )
    q, k, v, g = (x.requires_grad_() for x in (q, k, v, g))
    h0 = h0.float()
    state = (h0, z0.float()) if op == "normalized" else h0

    def call():
        if op == "gla":
            return gla(q, k, v, g, initial_state=state, output_final_state=True)
        return linear_attn(
            q, k, v, initial_state=state, output_final_state=True, normalize=op == "normalized"
        )

    want_o, want_s = call()
    want_grad = torch.autograd.grad(want_o.float().square().sum(), q)[0]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        o, s = call()
        grad = torch.autograd.grad(o.float().square().sum(), q)[0]
    # within bf16's resolution: the calls around the forms (the gate, the scale) still run under autocast
    assert o.dtype == torch.bfloat16 and rel(o.double(), want_o.double()) < 1e-2
    for got, want in zip(
        s if isinstance(s, tuple) else (s,), want_s if isinstance(want_s, tuple) else (want_s,)
    ):
        assert got.dtype == torch.float32 and rel(got.double(), want.double()) < 1e-2
    assert rel(grad.double(), want_grad.double()) < 2e-2
