"""torch.export of a converted hybrid with static shapes, through transformers' own wrapper.

transformers' ``TorchExportableModuleForDecoderOnlyLM`` (its export recipe for causal LMs, which its
export tests use) holds a static cache whose key and value tensors it allocates up front and registers
as buffers: torch.export needs every tensor a step writes to be a buffer of the exported module. A
hybrid's converted layers keep a recurrent state instead, which the cache would otherwise allocate at
the first step, inside the trace, so every call of the exported program would start from nothing.
:func:`export_decoder` allocates each state (zeros: a fresh sequence) in its static buffer before the trace
and registers it, and the exported step zeroes the states when ``cache_position`` is 0, as the wrapper
rewinds its keys' length there, so one exported program serves several sequences.
"""

from __future__ import annotations

import torch

from swaa.cache import token_count
from swaa.convert.record import hybrid_record
from swaa.convert.swap import decoder_layers
from swaa.validation import check_int

__all__ = ["export_decoder"]


def export_decoder(model, *, max_cache_len: int, batch_size: int = 1, strict: bool = True):
    """``torch.export`` of one decode step of ``model`` with a static cache of fixed shapes.

    Args:
        model (PreTrainedModel): a converted hybrid (or any causal LM transformers can export).
        max_cache_len (int): the static cache's length (prompt plus new tokens).
        batch_size (int): the static batch size. Default: 1.
        strict (bool): torch.export's strict mode (dynamo traces the step). Default: True.

    Returns:
        ``torch.export.ExportedProgram``: its ``module()`` takes ``(input_ids [B, 1], cache_position [1])``
        and returns logits ``[B, 1, vocab]``, one token per call; the cache lives in its buffers, and a
        call at position 0 starts a new sequence.

    Example::

        step = swaa.convert.export_decoder(model, max_cache_len=256).module()
        for t, token in enumerate(prompt_ids):
            logits = step(input_ids=token.view(1, 1), cache_position=torch.tensor([t]))
    """
    from transformers import GenerationConfig
    from transformers.integrations.executorch import TorchExportableModuleWithStaticCache

    check_int("batch_size", batch_size, minimum=1)
    check_int("max_cache_len", max_cache_len, minimum=1)
    model.generation_config = GenerationConfig(
        use_cache=True,
        cache_implementation="static",
        max_length=max_cache_len,
        cache_config={"batch_size": batch_size, "max_cache_len": max_cache_len},
    )
    device = next(model.parameters()).device
    # transformers' module holds the static cache with its keys and values registered as buffers
    cached = TorchExportableModuleWithStaticCache(model, batch_size, max_cache_len, device)
    record = hybrid_record(model.config)
    names, counts = [], []
    for i in record["linear_layers"] if record else []:
        layer = decoder_layers(model)[i].self_attn
        cached.static_cache.state_update(layer.zero_state(batch_size, device), i, {"num_new_tokens": 0})
        state = cached.static_cache.get_recurrent_state(i)
        for j, tensor in enumerate(state if isinstance(state, tuple) else (state,)):
            cached.register_buffer(f"recurrent_state_{i}_{j}", tensor, persistent=False)
            names.append(f"recurrent_state_{i}_{j}")
        cached.register_buffer(
            f"recurrent_count_{i}", token_count(cached.static_cache.layers[i]), persistent=False
        )
        counts.append(f"recurrent_count_{i}")
    step = _DecodeStep(cached, names, counts)
    example = {
        "input_ids": torch.zeros(batch_size, 1, dtype=torch.long, device=device),
        "cache_position": torch.zeros(1, dtype=torch.long, device=device),
    }
    with torch.no_grad():
        program = torch.export.export(step, args=(), kwargs=example, strict=strict)
    # tracing ran the step once on the real buffers: put the fresh sequence back
    with torch.no_grad():
        for name in names + counts:
            cached.get_buffer(name).zero_()
    return program


class _DecodeStep(torch.nn.Module):
    """transformers' static-cache module, preceded by what it does for the keys: each call sets every
    layer's length from ``cache_position``; here the converted layers' token counts follow, and their
    states are zeroed when ``cache_position`` is 0 (a new sequence)."""

    def __init__(self, cached, names: list[str], counts: list[str]):
        super().__init__()
        self.cached = cached
        self.names, self.counts = names, counts

    def forward(self, input_ids=None, cache_position=None):
        keep = cache_position[0] != 0
        for name in self.names:
            self.cached.get_buffer(name).mul_(keep)
        for name in self.counts:
            self.cached.get_buffer(name).copy_(cache_position[0])
        return self.cached(input_ids=input_ids, cache_position=cache_position)
