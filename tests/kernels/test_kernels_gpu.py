"""GPU tests of swaa.kernels (marked `gpu`, skipped without CUDA): FLA through the dispatcher and
the lean single-token path against the float64 oracle, forward, final state and every gradient; the
in-place decode step against the oracle, inside a CUDA graph and without host syncs."""

import pytest
import torch
import torch.nn.functional as F

from swaa.kernels import decode_step_, fla_available, gla, linear_attn, naive_gla, naive_linear_attn
from swaa.kernels.step_triton import decode_step_triton, triton_step_available

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]
needs_fla = pytest.mark.skipif(not fla_available(), reason="needs FLA (pip install fla-core)")

# relative error bounds of the issue: float32 inputs vs the float64 oracle, bfloat16 inputs
TOL = {torch.float32: 5e-3, torch.bfloat16: 2e-2}


def rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def make(B, T, H, K, V, seed=0, positive=False):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    kw = dict(device="cuda", dtype=torch.float64, generator=gen)
    q, k = torch.randn(B, T, H, K, **kw), torch.randn(B, T, H, K, **kw)
    v = torch.randn(B, T, H, V, **kw)
    # GLA's gate parametrisation: logsigmoid(x) / 16
    g = F.logsigmoid(torch.randn(B, T, H, K, **kw)) / 16
    if positive:
        q, k = F.elu(q) + 1, F.elu(k) + 1
    h0 = torch.randn(B, H, K, V, **kw)
    z0 = torch.rand(B, H, K, **kw) + 0.5
    do = torch.randn(B, T, H, V, **kw)
    return q, k, v, g, h0, z0, do


def grads(fn, tensors, do, dS):
    """Forward, then backward of <o, do> + <S, dS>; returns (o, S, grads of `tensors`)."""
    xs = [x.detach().clone().requires_grad_() for x in tensors]
    o, S = fn(*xs)
    loss = (o.double() * do).sum()
    for s, ds in zip(S if isinstance(S, tuple) else (S,), dS):
        loss = loss + (s.double() * ds).sum()
    loss.backward()
    return o.detach(), S, [x.grad for x in xs]


SHAPES = [
    pytest.param(2, 1, 2, 64, 64, id="T1"),
    pytest.param(2, 63, 2, 64, 64, id="T63"),
    pytest.param(2, 65, 2, 64, 64, id="T65"),
    pytest.param(1, 300, 3, 64, 128, id="T300-K!=V"),
    pytest.param(2, 200, 2, 128, 128, id="T200-D128"),
]


@needs_fla
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("B,T,H,K,V", SHAPES)
def test_fla_gla_matches_float64_oracle(B, T, H, K, V, dtype):
    q, k, v, g, h0, _, do = make(B, T, H, K, V)
    dS = torch.randn_like(h0)
    # the oracle sees the same rounded inputs, so what is measured is the kernel's error
    low = [x.to(dtype) for x in (q, k, v, g)] + [h0.float()]
    ref_o, ref_S, ref_g = grads(
        lambda q, k, v, g, h0: naive_gla(q, k, v, g, initial_state=h0, output_final_state=True),
        [x.double() for x in low],
        do,
        (dS,),
    )
    o, S, gr = grads(
        lambda q, k, v, g, h0: gla(q, k, v, g, initial_state=h0, output_final_state=True, backend="fla"),
        low,
        do,
        (dS,),
    )
    assert o.dtype == dtype and S.dtype == torch.float32
    tol = TOL[dtype]
    assert rel(o, ref_o) < tol
    assert rel(S, ref_S) < tol
    for name, a, b in zip(("dq", "dk", "dv", "dg", "dh0"), gr, ref_g):
        assert rel(a, b) < tol, name


@needs_fla
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("normalize", [False, True], ids=["plain", "normalized"])
@pytest.mark.parametrize("B,T,H,K,V", SHAPES)
def test_fla_linear_attn_matches_float64_oracle(B, T, H, K, V, dtype, normalize):
    q, k, v, _, h0, z0, do = make(B, T, H, K, V, positive=True)
    dS = (torch.randn_like(h0), torch.randn_like(z0)) if normalize else (torch.randn_like(h0),)

    def run(fn, backend=None):
        def call(q, k, v, h0, z0):
            extra = {} if backend is None else {"backend": backend}
            return fn(
                q,
                k,
                v,
                initial_state=(h0, z0) if normalize else h0,
                output_final_state=True,
                normalize=normalize,
                **extra,
            )

        return call

    low = [x.to(dtype) for x in (q, k, v)] + [h0.float(), z0.float()]
    ref_o, ref_S, ref_g = grads(run(naive_linear_attn), [x.double() for x in low], do, dS)
    o, S, gr = grads(run(linear_attn, "fla"), low, do, dS)
    tol = TOL[dtype]
    assert o.dtype == dtype and rel(o, ref_o) < tol
    for a, b in zip(S if normalize else (S,), ref_S if normalize else (ref_S,)):
        assert a.dtype == torch.float32 and rel(a, b) < tol
    names = ("dq", "dk", "dv", "dh0", "dz0") if normalize else ("dq", "dk", "dv", "dh0")
    for name, a, b in zip(names, gr, ref_g):
        assert rel(a, b) < tol, name


@needs_fla
@pytest.mark.parametrize("T", [1, 64, 65, 1000])
def test_dispatcher_backends_agree(T):
    q, k, v, g, h0, _, _ = make(2, T, 4, 64, 64)
    q, k, v, g = (x.float() for x in (q, k, v, g))
    h0 = h0.float()
    results = {
        b: gla(q, k, v, g, initial_state=h0, output_final_state=True, backend=b)
        for b in ("auto", "fla", "torch")
    }
    for b in ("auto", "fla"):
        assert rel(results[b][0], results["torch"][0]) < 5e-3
        assert rel(results[b][1], results["torch"][1]) < 5e-3


needs_triton = pytest.mark.skipif(not triton_step_available(), reason="needs triton")


@needs_triton
@pytest.mark.parametrize(
    "dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"]
)
@pytest.mark.parametrize("B,H,K,V", [(16, 16, 128, 128), (3, 2, 60, 40), (1, 4, 256, 64)])
@pytest.mark.parametrize("gated", [True, False], ids=["gla", "linear_attn"])
@pytest.mark.parametrize("with_h0", [True, False], ids=["h0", "no-h0"])
def test_triton_decode_step_matches_oracle(B, H, K, V, dtype, gated, with_h0):
    q, k, v, g, h0, _, _ = make(B, 1, H, K, V)
    args = [x.to(dtype) for x in (q, k, v, g)]
    S = h0.float() if with_h0 else None
    S64 = S.double() if with_h0 else None
    if gated:
        ref_o, ref_S = naive_gla(*(x.double() for x in args), initial_state=S64, output_final_state=True)
    else:
        ref_o, ref_S = naive_linear_attn(
            *(x.double() for x in args[:3]), initial_state=S64, output_final_state=True
        )
    o, S1 = decode_step_triton(*args[:3], args[3] if gated else None, K**-0.5, S, True)
    assert o.dtype == dtype and S1.dtype == torch.float32
    assert rel(o, ref_o) < TOL.get(dtype, 2e-2) and rel(S1, ref_S) < 1e-5


# the decode paths "auto" can take on CUDA: the Triton step (no grad) and the torch step
DECODE_PATHS = [
    pytest.param("auto", marks=needs_triton, id="auto-triton"),
    pytest.param("torch", id="torch-step"),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("backend", DECODE_PATHS)
def test_decode_step_matches_oracle_and_captures_in_a_cuda_graph(dtype, backend):
    B, H, K, V = 16, 16, 128, 128
    q, k, v, g, h0, _, _ = make(B, 1, H, K, V)
    args = [x.to(dtype) for x in (q, k, v, g)]
    S = h0.float()
    ref_o, ref_S = naive_gla(*(x.double() for x in args), initial_state=S.double(), output_final_state=True)
    o, S1 = gla(*args, initial_state=S, output_final_state=True, backend=backend)
    assert rel(o, ref_o) < TOL[dtype] and rel(S1, ref_S) < 1e-5

    # capture the same call in a graph; replaying it on new inputs gives the same answers
    static = [x.clone() for x in args] + [S.clone()]
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            gla(*static[:4], initial_state=static[4], output_final_state=True, backend=backend)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out_o, out_S = gla(*static[:4], initial_state=static[4], output_final_state=True, backend=backend)
    new = [torch.randn_like(x) for x in args[:3]] + [-torch.rand_like(args[3])]
    for buf, x in zip(static, new):
        buf.copy_(x)
    graph.replay()
    o_e, S_e = gla(*new, initial_state=S, output_final_state=True, backend=backend)
    assert torch.allclose(out_o.float(), o_e.float(), rtol=1e-3, atol=1e-3)
    assert torch.allclose(out_S, S_e, rtol=1e-5, atol=1e-5)


def test_decode_with_gradients_uses_a_differentiable_path():
    q, k, v, g, h0, _, _ = make(2, 1, 2, 16, 16)
    xs = [x.float().requires_grad_() for x in (q, k, v, g, h0)]
    o, S = gla(*xs[:4], initial_state=xs[4], output_final_state=True)
    (o.sum() + S.sum()).backward()
    assert all(x.grad is not None and torch.isfinite(x.grad).all() for x in xs)


def test_torch_backend_on_cuda_matches_oracle():
    q, k, v, g, h0, _, _ = make(2, 300, 2, 32, 16)
    o_ref, S_ref = naive_gla(q, k, v, g, initial_state=h0, output_final_state=True)
    o, S = gla(q, k, v, g, initial_state=h0, output_final_state=True, backend="torch")
    assert rel(o, o_ref) < 1e-10 and rel(S, S_ref) < 1e-10


@needs_fla
@pytest.mark.parametrize("normalize", [False, True], ids=["plain", "normalized"])
@pytest.mark.parametrize("lens", [[5, 70, 0, 33], [40, 200]], ids=["mixed+empty", "long"])
def test_fla_cu_seqlens_matches_torch(lens, normalize):
    T, N = sum(lens), len(lens)
    q, k, v, g, _, _, _ = make(1, T, 2, 64, 64, positive=True)
    q, k, v, g = (x.float() for x in (q, k, v, g))
    h0 = torch.randn(N, 2, 64, 64, device="cuda")
    z0 = torch.rand(N, 2, 64, device="cuda") + 0.5
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], device="cuda")
    ref = gla(q, k, v, g, initial_state=h0, output_final_state=True, cu_seqlens=cu, backend="torch")
    out = gla(q, k, v, g, initial_state=h0, output_final_state=True, cu_seqlens=cu, backend="fla")
    assert rel(out[0], ref[0]) < 5e-3 and rel(out[1], ref[1]) < 5e-3
    state = (h0, z0) if normalize else h0
    ref = linear_attn(
        q,
        k,
        v,
        initial_state=state,
        output_final_state=True,
        normalize=normalize,
        cu_seqlens=cu,
        backend="torch",
    )
    out = linear_attn(
        q,
        k,
        v,
        initial_state=state,
        output_final_state=True,
        normalize=normalize,
        cu_seqlens=cu,
        backend="fla",
    )
    assert rel(out[0], ref[0]) < 5e-3
    for a, b in zip(out[1] if normalize else (out[1],), ref[1] if normalize else (ref[1],)):
        assert rel(a, b) < 5e-3


# (gated, normalize) of the three single-token steps; the normalized one runs the torch step on CUDA
STEPS = [
    pytest.param(True, False, marks=needs_triton, id="gla-triton"),
    pytest.param(False, False, marks=needs_triton, id="linear_attn-triton"),
    pytest.param(False, True, id="linear_attn-normalized"),
]


def step_inputs(B, H, K, V, dtype, gated, normalize, seed=0):
    q, k, v, g, h0, z0, _ = make(B, 1, H, K, V, seed=seed, positive=normalize)
    q, k, v, g = (x.to(dtype) for x in (q, k, v, g))
    state = (h0.float(), z0.float()) if normalize else h0.float()
    return q, k, v, (g if gated else None), state


def parts(state):
    return list(state) if isinstance(state, (tuple, list)) else [state]


def clone_state(state):
    c = [s.clone() for s in parts(state)]
    return tuple(c) if isinstance(state, tuple) else c[0]


def oracle(q, k, v, g, state, normalize):
    s64 = clone_state(state)
    s64 = tuple(x.double() for x in s64) if normalize else s64.double()
    if g is not None:
        return naive_gla(
            q.double(), k.double(), v.double(), g.double(), initial_state=s64, output_final_state=True
        )
    return naive_linear_attn(
        q.double(), k.double(), v.double(), initial_state=s64, output_final_state=True, normalize=normalize
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("B,H,K,V", [(16, 16, 128, 128), (3, 2, 60, 40), (1, 4, 256, 64)])
@pytest.mark.parametrize("gated,normalize", STEPS)
def test_in_place_decode_step_matches_oracle_and_keeps_the_buffer(B, H, K, V, dtype, gated, normalize):
    q, k, v, g, state = step_inputs(B, H, K, V, dtype, gated, normalize)
    ref_o, ref_S = oracle(q, k, v, g, state, normalize)
    buf = clone_state(state)
    ptrs = [x.data_ptr() for x in parts(buf)]
    o = decode_step_(q, k, v, g, state=buf, normalize=normalize)
    assert o.shape == (B, 1, H, V) and o.dtype == dtype
    assert [x.data_ptr() for x in parts(buf)] == ptrs
    assert rel(o, ref_o) < TOL[dtype]
    for a, b in zip(parts(buf), parts(ref_S)):
        assert a.dtype == torch.float32 and rel(a, b) < 1e-5
    if not normalize:
        # writing over its input gives the out-of-place kernel's answer to the bit (no tile read after a write)
        o2, S2 = decode_step_triton(q, k, v, g, K**-0.5, state, True)
        assert torch.equal(o, o2) and torch.equal(buf, S2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("gated,normalize", STEPS)
def test_in_place_decode_step_replays_in_a_cuda_graph(dtype, gated, normalize):
    B, H, K, V = 4, 8, 64, 64
    q, k, v, g, state = step_inputs(B, H, K, V, dtype, gated, normalize)
    static_in = [None if x is None else x.clone() for x in (q, k, v, g)]
    static_state = clone_state(state)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):  # compiles the Triton kernel outside the capture
            decode_step_(*static_in, state=static_state, normalize=normalize)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_o = decode_step_(*static_in, state=static_state, normalize=normalize)
    for buf, x in zip(parts(static_state), parts(state)):
        buf.copy_(x)  # the warm-up advanced the state; capture itself ran nothing
    eager_state = clone_state(state)
    ptrs = [x.data_ptr() for x in parts(static_state)]
    for step in range(5):
        new = step_inputs(B, H, K, V, dtype, gated, normalize, seed=step + 1)[:4]
        for buf, x in zip(static_in, new):
            if buf is not None:
                buf.copy_(x)
        graph.replay()
        o_e = decode_step_(*new, state=eager_state, normalize=normalize)
        torch.testing.assert_close(static_o, o_e, rtol=1e-5, atol=1e-5)
        for a, b in zip(parts(static_state), parts(eager_state)):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert [x.data_ptr() for x in parts(static_state)] == ptrs


@pytest.mark.parametrize("gated,normalize", STEPS)
def test_decode_calls_never_sync_with_the_host(gated, normalize):
    q, k, v, g, state = step_inputs(2, 4, 64, 64, torch.bfloat16, gated, normalize)
    buf = clone_state(state)

    def calls():
        decode_step_(q, k, v, g, state=buf, normalize=normalize)
        if gated:
            gla(q, k, v, g, initial_state=state, output_final_state=True)
        else:
            linear_attn(q, k, v, initial_state=state, output_final_state=True, normalize=normalize)

    calls()  # first calls compile kernels and may query the device
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        calls()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()
