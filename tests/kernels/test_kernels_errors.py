"""Bad input to swaa.kernels: the error type, a message naming the argument, and no side effects."""

import sys
import types
import warnings

import pytest
import torch

from swaa.kernels import decode_step_, gla, linear_attn, naive_gla, naive_linear_attn

FLA_ADAPTER = sys.modules["swaa.kernels.fla_adapter"]


def inputs(B=1, T=5, H=2, K=4, V=3, dtype=torch.float32):
    q, k = torch.randn(B, T, H, K, dtype=dtype), torch.randn(B, T, H, K, dtype=dtype)
    v = torch.randn(B, T, H, V, dtype=dtype)
    g = -torch.rand(B, T, H, K, dtype=dtype)
    return q, k, v, g


def state(B=1, H=2, K=4, V=3, dtype=torch.float32):
    return torch.randn(B, H, K, V, dtype=dtype)


def bad_gla_calls():
    q, k, v, g = inputs()
    h0 = state()
    return [
        pytest.param(dict(q=q.tolist()), TypeError, "q must be a torch.Tensor", id="q-list"),
        pytest.param(dict(q=q[0]), ValueError, r"q must have shape \[B, T, H, K\]", id="q-3d"),
        pytest.param(dict(k=k[:, :4]), ValueError, "k must have the shape of q", id="k-shape"),
        pytest.param(dict(v=v[:, :, :1]), ValueError, r"v must have shape \[B, T, H, V\]", id="v-shape"),
        pytest.param(dict(v=v.double()), TypeError, "v must have the dtype of q", id="v-dtype"),
        pytest.param(dict(q=q.int(), k=k.int(), v=v.int()), TypeError, "q must be float16", id="int"),
        pytest.param(dict(g=g[..., :2]), ValueError, "g must have the shape of q", id="g-shape"),
        pytest.param(dict(g=-g), ValueError, r"g must be a log forget gate \(all entries <= 0\)", id="g>0"),
        pytest.param(
            dict(scale="0.5"), TypeError, "scale must be a finite number, got str '0.5'", id="scale-str"
        ),
        pytest.param(
            dict(scale=True), TypeError, "scale must be a finite number, got bool True", id="scale-bool"
        ),
        pytest.param(
            dict(scale=float("nan")), ValueError, "scale must be a finite number, got nan", id="scale-nan"
        ),
        pytest.param(dict(output_final_state=1), TypeError, "output_final_state must be a bool", id="flag"),
        pytest.param(
            dict(initial_state=h0[:, :1]),
            ValueError,
            r"initial_state must have shape \[1, 2, 4, 3\]",
            id="h0-shape",
        ),
        pytest.param(
            dict(initial_state=h0.bfloat16()),
            TypeError,
            "initial_state must have dtype torch.float32",
            id="h0-dtype",
        ),
        pytest.param(
            dict(initial_state=(h0, h0)), TypeError, "initial_state must be a tensor", id="h0-tuple"
        ),
        pytest.param(dict(k=k.to("meta")), ValueError, "k must be on cpu", id="device"),
        pytest.param(
            dict(cu_seqlens=torch.tensor([0, 2, 4])), ValueError, "must start at 0.*end at T=5", id="cu-end"
        ),
        pytest.param(
            dict(cu_seqlens=torch.tensor([0, 3, 2, 5])), ValueError, "non-decreasing", id="cu-order"
        ),
        pytest.param(
            dict(cu_seqlens=torch.tensor([0.0, 5.0])),
            TypeError,
            "cu_seqlens must be int32 or int64",
            id="cu-float",
        ),
        pytest.param(
            dict(cu_seqlens=torch.tensor([[0, 5]])), ValueError, "cu_seqlens must be a 1-D", id="cu-2d"
        ),
        pytest.param(
            dict(cu_seqlens=torch.tensor([0, 5]), initial_state=state(2)),
            ValueError,
            r"initial_state must have shape \[1, 2, 4, 3\]",
            id="cu-h0-count",
        ),
    ]


@pytest.mark.parametrize("fn", [gla, naive_gla], ids=["gla", "naive_gla"])
@pytest.mark.parametrize("override,exc,match", bad_gla_calls())
def test_gla_rejects_bad_input_and_changes_nothing(fn, override, exc, match):
    q, k, v, g = inputs()
    h0 = state()
    args = dict(q=q, k=k, v=v, g=g, initial_state=h0, output_final_state=True)
    args.update(override)
    before = {
        name: x.clone() for name, x in args.items() if isinstance(x, torch.Tensor) and x.device.type != "meta"
    }
    with pytest.raises(exc, match=match):
        fn(**args)
    for name, x in before.items():
        assert torch.equal(args[name], x), f"{name} changed by a refused call"


@pytest.mark.parametrize("backend", ["cuda", "", None])
def test_unknown_backend_is_refused(backend):
    q, k, v, g = inputs()
    with pytest.raises(ValueError, match=r"backend must be one of \('auto', 'torch', 'fla'\)"):
        gla(q, k, v, g, backend=backend)
    with pytest.raises(ValueError, match="backend must be one of"):
        linear_attn(q, k, v, backend=backend)


def test_cu_seqlens_needs_batch_one():
    q, k, v, g = inputs(B=2)
    with pytest.raises(
        ValueError, match=r"q must have batch size 1 when cu_seqlens is given \(packed sequences\), got 2"
    ):
        gla(q, k, v, g, cu_seqlens=torch.tensor([0, 5]))


def test_float64_inputs_need_a_float64_state():
    q, k, v, g = inputs(dtype=torch.float64)
    with pytest.raises(TypeError, match="initial_state must have dtype torch.float64"):
        gla(q, k, v, g, initial_state=state())


@pytest.mark.parametrize("fn", [linear_attn, naive_linear_attn], ids=["linear_attn", "naive"])
def test_normalized_state_must_be_a_pair(fn):
    q, k, v, _ = inputs()
    h0 = state()
    with pytest.raises(TypeError, match=r"initial_state must be a tuple \(kv_state"):
        fn(q, k, v, initial_state=h0, normalize=True)
    with pytest.raises(ValueError, match=r"initial_state\[1\] \(z_state\) must have shape \[1, 2, 4\]"):
        fn(q, k, v, initial_state=(h0, h0), normalize=True)
    with pytest.raises(TypeError, match="normalize must be a bool"):
        fn(q, k, v, normalize="yes")


@pytest.mark.parametrize("fn", [gla, linear_attn], ids=["gla", "linear_attn"])
def test_backend_fla_on_cpu_raises_with_a_hint(fn):
    q, k, v, g = inputs()
    args = (q, k, v, g) if fn is gla else (q, k, v)
    with pytest.raises(ValueError, match="backend='fla' needs CUDA tensors, got tensors on cpu"):
        fn(*args, backend="fla")


def _fake_cuda_tensor(dtype=torch.float32):
    # use_fla only looks at the device and dtype; a stand-in lets the CUDA branches run anywhere
    return types.SimpleNamespace(device=torch.device("cuda", 0), dtype=dtype)


def test_backend_fla_without_fla_raises_install_hint(monkeypatch):
    monkeypatch.setattr(FLA_ADAPTER, "_import_fla", lambda: (None, ImportError("No module named 'fla'")))
    with pytest.raises(ImportError, match="pip install fla-core"):
        FLA_ADAPTER.use_fla("fla", _fake_cuda_tensor())
    with pytest.raises(ValueError, match="float64"):
        FLA_ADAPTER.use_fla("fla", _fake_cuda_tensor(torch.float64))


def test_auto_on_cuda_without_fla_warns_once(monkeypatch):
    monkeypatch.setattr(FLA_ADAPTER, "_import_fla", lambda: (None, ImportError("No module named 'fla'")))
    monkeypatch.setattr(FLA_ADAPTER, "_warned_missing", False)
    with pytest.warns(RuntimeWarning, match="FLA is not available"):
        assert FLA_ADAPTER.use_fla("auto", _fake_cuda_tensor()) is False
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert FLA_ADAPTER.use_fla("auto", _fake_cuda_tensor()) is False
    # float64 on CUDA is an exactness run: torch, silently
    assert FLA_ADAPTER.use_fla("auto", _fake_cuda_tensor(torch.float64)) is False


def test_single_token_gate_is_checked_in_eager_cpu_calls():
    # the decode path skips the value check only where it would cost a sync or a graph break
    q, k, v, g = inputs(T=1)
    with pytest.raises(ValueError, match=r"g must be a log forget gate \(all entries <= 0\), got max"):
        gla(q, k, v, -g)
    with pytest.raises(ValueError, match="g must be a log forget gate"):
        decode_step_(q, k, v, -g, state=state())


def bad_decode_step_calls():
    q, k, v, g = inputs(T=1)
    h0, z0 = state(), torch.rand(1, 2, 4)
    return [
        pytest.param(
            dict(q=inputs(T=2)[0], k=inputs(T=2)[1], v=inputs(T=2)[2], g=None),
            ValueError,
            r"decode_step_ takes one token: q must have shape \[B, 1, H, K\], got \[1, 2, 2, 4\]",
            id="T2",
        ),
        pytest.param(
            dict(state=None),
            TypeError,
            r"state must be the state to update in place, \[B, H, K, V\]",
            id="state-none",
        ),
        pytest.param(
            dict(state=h0[:, :1]),
            ValueError,
            r"state must have shape \[1, 2, 4, 3\], got \[1, 1, 4, 3\]",
            id="state-shape",
        ),
        pytest.param(
            dict(state=h0.double()), TypeError, "state must have dtype torch.float32", id="state-dtype"
        ),
        pytest.param(dict(state=(h0, z0)), TypeError, "state must be a tensor", id="state-tuple"),
        pytest.param(
            dict(g=None, normalize=True, state=h0),
            TypeError,
            r"state must be a tuple \(kv_state",
            id="normalized-state-tensor",
        ),
        pytest.param(
            dict(g=None, normalize=True, state=(h0, z0[..., :2])),
            ValueError,
            r"state\[1\] \(z_state\) must have shape \[1, 2, 4\]",
            id="z-shape",
        ),
        pytest.param(
            dict(normalize=True, state=(h0, z0)),
            ValueError,
            r"normalize=True is for linear attention \(g=None\), got a gate g",
            id="normalized-gla",
        ),
        pytest.param(dict(normalize=1), TypeError, "normalize must be a bool, got int 1", id="normalize-int"),
        pytest.param(dict(scale="2"), TypeError, "scale must be a finite number, got str '2'", id="scale"),
        pytest.param(dict(k=k.double()), TypeError, "k must have the dtype of q", id="k-dtype"),
        pytest.param(
            dict(q=q.clone().requires_grad_()),
            ValueError,
            "decode_step_ updates state in place and has no backward, got q requiring grad",
            id="q-grad",
        ),
        pytest.param(
            dict(state=h0.clone().requires_grad_()), ValueError, "got state requiring grad", id="state-grad"
        ),
    ]


@pytest.mark.parametrize("override,exc,match", bad_decode_step_calls())
def test_decode_step_rejects_bad_input_and_changes_no_state(override, exc, match):
    q, k, v, g = inputs(T=1)
    args = dict(q=q, k=k, v=v, g=g, state=state())
    args.update(override)
    st = args["state"]
    before = [x.detach().clone() for x in (st if isinstance(st, tuple) else (st,))] if st is not None else []
    state_kw = args.pop("state")
    with pytest.raises(exc, match=match):
        decode_step_(**args, state=state_kw)
    after = list(state_kw) if isinstance(state_kw, tuple) else ([state_kw] if state_kw is not None else [])
    for b, a in zip(before, after):
        assert torch.equal(a, b), "state changed by a refused call"


def test_decode_step_under_no_grad_accepts_inputs_that_require_grad():
    q, k, v, g = inputs(T=1)
    S = state().requires_grad_()
    expected, S1 = gla(q, k, v, g, initial_state=S.detach(), output_final_state=True)
    with torch.no_grad():
        o = decode_step_(q.requires_grad_(), k, v, g, state=S)
    assert torch.equal(o, expected) and torch.equal(S.detach(), S1)
