"""Argument validation for every kernel entry point (public functions, in-place step and oracles).

Every check runs before any computation, so a refused call changes nothing. The checks read tensor
values only where that is free and traceable: never on CUDA (it would force a device sync), never
under torch.compile / torch.export or on fake and meta tensors (a value-dependent branch would break
the graph). So a single-token decode call has no host sync and compiles into one graph.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from swaa.validation import check_bool, check_number

# the values of every `backend` argument, kernels and layers alike
BACKENDS = ("auto", "torch", "fla")
# activation dtypes that are computed in float32 (state, normalizers, oracle comparisons)
HALF_DTYPES = (torch.float16, torch.bfloat16)
# activation dtypes FLA's and swaa's Triton kernels accept (not float64)
FLA_DTYPES = (*HALF_DTYPES, torch.float32)
# activation dtypes the torch paths accept; float64 runs the exact oracle comparisons
FLOAT_DTYPES = (*FLA_DTYPES, torch.float64)


@dataclass(frozen=True)
class Problem:
    """Sizes and resolved options of one validated call."""

    B: int
    T: int
    H: int
    K: int
    V: int
    # number of sequences: B, or len(cu_seqlens) - 1 for packed inputs
    N: int
    scale: float
    state_dtype: torch.dtype
    gated: bool
    normalize: bool
    output_final_state: bool
    backend: str


def state_dtype_for(dtype: torch.dtype) -> torch.dtype:
    """The recurrent state's dtype: float64 for float64 inputs, float32 for everything else."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def values_checkable(x: torch.Tensor) -> bool:
    """Whether a check may read `x`'s values: a real tensor off CUDA, outside compile and export."""
    if x.device.type in ("cuda", "meta") or torch.compiler.is_compiling():
        return False
    return not torch._subclasses.fake_tensor.is_fake(x)


def _tensor(name, x):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")


def _check_state(name, x, shape, dtype, device):
    _tensor(name, x)
    if tuple(x.shape) != shape:
        raise ValueError(f"{name} must have shape {list(shape)}, got {list(x.shape)}")
    if x.dtype != dtype:
        raise TypeError(f"{name} must have dtype {dtype} (the state dtype for these inputs), got {x.dtype}")
    if x.device != device:
        raise ValueError(f"{name} must be on {device} like q, got {x.device}")


def check_inputs(
    q,
    k,
    v,
    g=None,
    *,
    gated: bool,
    scale=None,
    initial_state=None,
    output_final_state=False,
    normalize=False,
    cu_seqlens=None,
    backend="auto",
    state_name="initial_state",
) -> Problem:
    """Validate one call of `linear_attn` / `gla` (or their naive twins) and return its sizes.

    Raises TypeError for wrong types/dtypes and ValueError for wrong shapes, devices or values,
    each naming the argument (the state as `state_name`), what was expected and what was given.
    """
    for name, x in (("q", q), ("k", k), ("v", v)) + ((("g", g),) if gated else ()):
        _tensor(name, x)
        if x.dim() != 4:
            what = "[B, T, H, V]" if name == "v" else "[B, T, H, K]"
            raise ValueError(f"{name} must have shape {what} (4 dims), got {list(x.shape)}")
        if x.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {x.dtype}")
        if x.device != q.device:
            raise ValueError(f"{name} must be on {q.device} like q, got {x.device}")
    for name, x in (("k", k), ("v", v)):
        if x.dtype != q.dtype:
            raise TypeError(f"{name} must have the dtype of q ({q.dtype}), got {x.dtype}")
    B, T, H, K = q.shape
    V = v.shape[-1]
    if tuple(k.shape) != (B, T, H, K):
        raise ValueError(f"k must have the shape of q {list(q.shape)}, got {list(k.shape)}")
    if tuple(v.shape[:3]) != (B, T, H):
        raise ValueError(f"v must have shape [B, T, H, V] = [{B}, {T}, {H}, V], got {list(v.shape)}")
    if K == 0 or V == 0 or H == 0:
        raise ValueError(f"head count and head dims must be positive, got H={H}, K={K}, V={V}")
    if gated:
        if tuple(g.shape) != (B, T, H, K):
            raise ValueError(f"g must have the shape of q {list(q.shape)}, got {list(g.shape)}")
        # amax: one reduction, ~20x faster than (g > 0).any() on CPU; NaN passes
        if g.numel() and values_checkable(g) and bool(g.amax() > 0):
            raise ValueError(f"g must be a log forget gate (all entries <= 0), got max {g.max().item():.4g}")

    scale = K**-0.5 if scale is None else check_number("scale", scale)
    check_bool("output_final_state", output_final_state)
    check_bool("normalize", normalize)
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")

    N = B
    if cu_seqlens is not None:
        _tensor("cu_seqlens", cu_seqlens)
        if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
            raise ValueError(
                f"cu_seqlens must be a 1-D tensor [N + 1] with N >= 1, got shape {list(cu_seqlens.shape)}"
            )
        if cu_seqlens.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"cu_seqlens must be int32 or int64, got {cu_seqlens.dtype}")
        if cu_seqlens.device != q.device:
            raise ValueError(f"cu_seqlens must be on {q.device} like q, got {cu_seqlens.device}")
        if B != 1:
            raise ValueError(f"q must have batch size 1 when cu_seqlens is given (packed sequences), got {B}")
        N = cu_seqlens.numel() - 1
        # reading the offsets syncs on CUDA, which packed prefill (never the decode path) can afford;
        # under compile it would break the graph, so there the caller vouches for them
        if not torch.compiler.is_compiling() and cu_seqlens.device.type != "meta":
            offsets = cu_seqlens.tolist()
            if offsets[0] != 0 or offsets[-1] != T or any(b < a for a, b in zip(offsets, offsets[1:])):
                raise ValueError(
                    f"cu_seqlens must start at 0, be non-decreasing and end at T={T}, got {offsets}"
                )

    sdt = state_dtype_for(q.dtype)
    name = state_name
    if initial_state is not None:
        if normalize:
            if not isinstance(initial_state, (tuple, list)) or len(initial_state) != 2:
                raise TypeError(
                    f"{name} must be a tuple (kv_state [N, H, K, V], z_state [N, H, K]) "
                    f"when normalize=True, got {type(initial_state).__name__}"
                )
            _check_state(f"{name}[0] (kv_state)", initial_state[0], (N, H, K, V), sdt, q.device)
            _check_state(f"{name}[1] (z_state)", initial_state[1], (N, H, K), sdt, q.device)
        else:
            if isinstance(initial_state, (tuple, list)):
                raise TypeError(f"{name} must be a tensor [N, H, K, V] when normalize=False, got a tuple")
            _check_state(name, initial_state, (N, H, K, V), sdt, q.device)
    return Problem(B, T, H, K, V, N, float(scale), sdt, gated, normalize, output_final_state, backend)


def check_decode_step(q, k, v, g, state, scale, normalize) -> Problem:
    """Validate one call of `decode_step_`: `check_inputs` plus what updating `state` in place needs.

    The state is required (it is the buffer written), T must be 1, normalization has no gated
    form, and nothing may need gradients: the step overwrites its input and has no backward.
    """
    gated = g is not None
    if state is None:
        what = "(kv_state [B, H, K, V], z_state [B, H, K])" if normalize is True else "[B, H, K, V]"
        raise TypeError(f"state must be the state to update in place, {what}, got None")
    p = check_inputs(
        q, k, v, g, gated=gated, scale=scale, initial_state=state, normalize=normalize, state_name="state"
    )
    if p.T != 1:
        raise ValueError(f"decode_step_ takes one token: q must have shape [B, 1, H, K], got {list(q.shape)}")
    if gated and normalize:
        raise ValueError("normalize=True is for linear attention (g=None), got a gate g")
    named = [("q", q), ("k", k), ("v", v), ("g", g)]
    named += [("state[0]", state[0]), ("state[1]", state[1])] if normalize else [("state", state)]
    if torch.is_grad_enabled():
        for name, x in named:
            if x is not None and x.requires_grad:
                raise ValueError(
                    f"decode_step_ updates state in place and has no backward, got {name} requiring grad; "
                    "run it under torch.no_grad() or call gla / linear_attn with output_final_state=True"
                )
    return p
