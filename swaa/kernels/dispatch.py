"""The one dispatcher behind `gla`, `linear_attn` and `decode_step_`: given a validated call, pick
the single-token decode step, FLA's kernels or the torch forms, for both operations.

Paths, in the order they are tried:
- decode: T == 1 without cu_seqlens under backend="auto". swaa's one-kernel Triton step on CUDA when
  no gradients are wanted and the call is unnormalized (far less host time than FLA's launch path),
  else the torch step; neither syncs with the host, so the step compiles into one graph and
  captures in a CUDA graph.
- FLA: `fla_adapter.use_fla` says yes (CUDA tensors; "fla" raises when it cannot run).
- torch: the chunked forms (packed sequences padded into a batch), or the torch step for T == 1.
"""

from __future__ import annotations

import contextlib

import torch

from swaa.kernels import fla_adapter
from swaa.kernels.checks import Problem
from swaa.kernels.gla import chunk_gla_torch, gla_step_torch
from swaa.kernels.linear_attn import chunk_linear_attn_torch, linear_attn_step_torch, normalize_fla_output
from swaa.kernels.step_triton import decode_step_triton, use_triton_step
from swaa.kernels.varlen import Packing


def run(p: Problem, q, k, v, g, initial_state, cu_seqlens):
    """Compute one call that `check_inputs` accepted (`p`); returns `(o, final_state)`."""
    if cu_seqlens is None and (p.B == 0 or p.T == 0):
        # nothing to compute: every path would divide by B or launch an empty grid. An explicit
        # backend="fla" that cannot run still says so
        fla_adapter.use_fla(p.backend, q)
        return v.new_zeros(v.shape), (_unchanged_state(p, q, initial_state) if p.output_final_state else None)
    if p.T == 1 and cu_seqlens is None and p.backend == "auto":
        return _decode(p, q, k, v, g, initial_state)
    if fla_adapter.use_fla(p.backend, q):
        return _fla(p, q, k, v, g, initial_state, cu_seqlens)
    return _torch(p, q, k, v, g, initial_state, cu_seqlens)


def step_in_place(p: Problem, q, k, v, g, state):
    """One token (`p` from `check_decode_step`) written into `state`; returns o `[B, 1, H, V]`."""
    if not p.normalize and state.is_contiguous() and use_triton_step(q, k, v, g, state):
        return decode_step_triton(q, k, v, g, p.scale, state, state_out=state)[0]
    # the torch step, then copy_: the state keeps its address (and stays what a CUDA graph or a
    # static cache points at). The Triton kernel cannot update the normalizer z in place: every
    # value tile of a head needs the old z, so the program writing it would race the others
    o, new = _step_torch(p, q, k, v, g, state, output_final_state=True)
    if p.normalize:
        state[0].copy_(new[0])
        state[1].copy_(new[1])
    else:
        state.copy_(new)
    return o


def _decode(p, q, k, v, g, state):
    if not p.normalize and use_triton_step(q, k, v, g, state):
        return decode_step_triton(q, k, v, g, p.scale, state, p.output_final_state)
    return _step_torch(p, q, k, v, g, state, p.output_final_state)


def _own_precision(x):
    # the torch forms compute in their declared precision (float32 states, the inputs' dtype out), as FLA's
    # kernels do under autocast; autocast would cast their matmuls to half and mix dtypes in place
    if torch.is_autocast_enabled(x.device.type):
        return torch.autocast(x.device.type, enabled=False)
    return contextlib.nullcontext()


def _step_torch(p, q, k, v, g, state, output_final_state):
    with _own_precision(q):
        if p.gated:
            return gla_step_torch(q, k, v, g, p.scale, state, output_final_state)
        return linear_attn_step_torch(q, k, v, p.scale, state, output_final_state, p.normalize)


def _chunk_torch(p, q, k, v, g, state):
    with _own_precision(q):
        if p.gated:
            return chunk_gla_torch(q, k, v, g, p.scale, state, p.output_final_state)
        return chunk_linear_attn_torch(q, k, v, p.scale, state, p.output_final_state, p.normalize)


def _torch(p, q, k, v, g, state, cu_seqlens):
    if cu_seqlens is not None:
        pk = Packing(cu_seqlens)
        padded = [None if x is None else pk.pad(x) for x in (q, k, v, g)]
        o, S = _chunk_torch(p, *padded, state)
        return pk.unpad(o), S
    if p.T == 1:
        return _step_torch(p, q, k, v, g, state, p.output_final_state)
    return _chunk_torch(p, q, k, v, g, state)


def _unchanged_state(p, q, state):
    # the final state of an empty input: the initial state, zeros where none was given
    S0, z0 = state if (p.normalize and state is not None) else (state, None)
    S = S0 if S0 is not None else q.new_zeros(p.N, p.H, p.K, p.V, dtype=p.state_dtype)
    if not p.normalize:
        return S
    return S, (z0 if z0 is not None else q.new_zeros(p.N, p.H, p.K, dtype=p.state_dtype))


def _fla(p, q, k, v, g, state, cu_seqlens):
    if p.gated:
        return fla_adapter.gla(q, k, v, g, p.scale, state, p.output_final_state, cu_seqlens)
    S0, z0 = state if (p.normalize and state is not None) else (state, None)
    # FLA's normalized state changed layout and precision across releases: FLA runs unnormalized
    # and the normalization runs here in float32, as on the torch path
    o, S = fla_adapter.linear_attn(q, k, v, p.scale, S0, p.output_final_state, cu_seqlens)
    if not p.normalize:
        return o.to(v.dtype), S
    o, z = normalize_fla_output(o, q, k, v.dtype, p.scale, z0, cu_seqlens)
    return o, ((S, z) if p.output_final_state else None)
