"""What the CLI and the demo measure (application code, on top of the conversion API): perplexity over a text, cache bytes, a chat answer, the layer map."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from swaa.convert.windows import check_windows
from swaa.layers.host_inputs import cache_argument

__all__ = [
    "CacheBytes",
    "answer",
    "cache_argument",
    "cache_bytes",
    "encode_prompt",
    "generate_reply",
    "attention_types",
    "perplexity",
    "tokenize_text",
]


def attention_types(model) -> list[str]:
    """Attention of each decoder layer: ``"softmax"``, or the conversion kind of its swaa layer (a key of
    ``swaa.convert.KINDS``: ``"gla"``, ``"linear"``, ``"swa_gla"``, ...; a subclass of a swaa layer
    reads as the kind it derives from)."""
    from swaa.conversion import KINDS

    kind_of = {name: kind for kind, name in KINDS.items()}
    kinds = []
    for layer in model.model.layers:
        names = [cls.__name__ for cls in type(layer.self_attn).__mro__ if cls.__module__.startswith("swaa.")]
        kinds.append(next((kind_of[n] for n in names if n in kind_of), "softmax"))
    return kinds


def tokenize_text(tokenizer, text: str) -> torch.Tensor:
    """Token ids ``[N]`` of ``text`` with no special tokens added (a plain running text)."""
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    if len(ids) < 2:
        raise ValueError(f"text: need at least 2 tokens to measure perplexity, got {len(ids)}")
    return torch.tensor(ids, dtype=torch.long)


@torch.no_grad()
def perplexity(
    model,
    ids: torch.Tensor,
    window: int = 512,
    max_windows: int | None = None,
    progress: bool = True,
    desc: str = "perplexity",
) -> dict:
    """Perplexity of ``model`` over consecutive, non-overlapping windows of a token sequence.

    Each window is scored on its own, from an empty context: the loss covers its ``window - 1`` next-token
    predictions. The same ``ids``/``window``/``max_windows`` give the same windows for every model, so two
    models are compared on exactly the same tokens.

    Args:
        model: a causal LM.
        ids (torch.Tensor): ``[N]`` token ids.
        window (int): tokens per window (>= 2). Default: 512.
        max_windows (int | None): score only the first ``max_windows`` windows (None: all full windows, or
            the whole text as one window when it is shorter than ``window``). Default: None.
        progress (bool): show a tqdm bar. Default: True.

    Returns:
        dict with ``perplexity`` (float), ``nll`` (mean negative log-likelihood, nats/token), ``tokens``
        (number of predictions scored) and ``windows``.
    """
    from tqdm.auto import tqdm

    check_windows(window, max_windows)
    ids = ids.reshape(-1)
    count = max(len(ids) // window, 1)
    if max_windows is not None:
        count = min(count, max_windows)
    device = next(model.parameters()).device
    total_nll, total_tokens = 0.0, 0
    for w in tqdm(range(count), desc=desc, disable=not progress, unit="window"):
        chunk = ids[w * window : (w + 1) * window].to(device)[None]
        logits = model(chunk, use_cache=False).logits.float()
        logp = torch.log_softmax(logits[0, :-1], dim=-1)
        nll = -logp.gather(-1, chunk[0, 1:, None]).sum()
        total_nll += nll.item()
        total_tokens += chunk.shape[1] - 1
    mean = total_nll / total_tokens
    return {"perplexity": math.exp(mean), "nll": mean, "tokens": total_tokens, "windows": count}


@dataclass
class CacheBytes:
    """Cache size of a model, measured from a real cache after a short prefill.

    Attributes:
        kinds (list[str]): attention kind of each layer.
        kv_bytes_per_token (int): bytes the softmax layers add per token (keys + values, all layers, B=1).
        state_bytes (int): bytes of the fixed-size states of the linear layers (all layers, B=1).
        per_layer (list[tuple[str, int, int]]): ``(kind, kv bytes per token, state bytes)`` per layer.
    """

    kinds: list[str]
    kv_bytes_per_token: int
    state_bytes: int
    per_layer: list[tuple[str, int, int]] = field(default_factory=list)

    def at(self, num_tokens: int, batch_size: int = 1) -> int:
        """Total cache bytes after ``num_tokens`` tokens for ``batch_size`` sequences."""
        return batch_size * (self.kv_bytes_per_token * num_tokens + self.state_bytes)


def _nbytes(x) -> int:
    if x is None:
        return 0
    if isinstance(x, torch.Tensor):
        return 0 if x.device.type == "meta" else x.numel() * x.element_size()
    if isinstance(x, (tuple, list)):
        return sum(_nbytes(t) for t in x)
    return 0


@torch.no_grad()
def cache_bytes(model, probe_tokens: int = 8) -> CacheBytes:
    """Measure the cache of ``model``: run ``probe_tokens`` tokens into a fresh ``DynamicCache`` and count.

    KV grows linearly with the tokens and a linear layer's state does not, so one short prefill gives the
    size at any length (:meth:`CacheBytes.at`). Measured, not computed from the config, so it counts
    what the layers really store (dtype, grouped heads, extra state).
    """
    from transformers import DynamicCache

    kinds = attention_types(model)
    device = next(model.parameters()).device
    ids = torch.zeros(1, probe_tokens, dtype=torch.long, device=device)
    cache = DynamicCache()
    model(ids, use_cache=True, **{cache_argument(model): cache})
    per_layer = []
    for i, kind in enumerate(kinds):
        layer = cache.layers[i] if i < len(cache.layers) else None
        kv = _nbytes(getattr(layer, "keys", None)) + _nbytes(getattr(layer, "values", None))
        state = (
            _nbytes(cache.get_recurrent_state(i))
            if hasattr(cache, "get_recurrent_state") and kind != "softmax"
            else 0
        )
        if kv % probe_tokens:
            raise RuntimeError(
                f"layer {i}: cache holds {kv} KV bytes after {probe_tokens} tokens, not a per-token multiple"
            )
        per_layer.append((kind, kv // probe_tokens, state))
    return CacheBytes(
        kinds=kinds,
        kv_bytes_per_token=sum(p[1] for p in per_layer),
        state_bytes=sum(p[2] for p in per_layer),
        per_layer=per_layer,
    )


def encode_prompt(tokenizer, prompt: str, chat: bool = True, device=None) -> dict:
    """``input_ids`` / ``attention_mask`` ``[1, T]`` of ``prompt``, through the chat template (as a user
    turn, ending with the assistant's turn) when ``chat`` is on and the tokenizer has one."""
    if chat and getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
        enc = tokenizer(text, return_tensors="pt", return_token_type_ids=False, add_special_tokens=False)
    else:
        enc = tokenizer(prompt, return_tensors="pt", return_token_type_ids=False)
    return {k: v.to(device) for k, v in enc.items()} if device is not None else dict(enc)


@torch.no_grad()
def generate_reply(model, tokenizer, prompt: str, chat: bool = True, **generate_kwargs) -> str:
    """``model.generate`` on ``prompt`` (see :func:`encode_prompt`); returns the new text only."""
    enc = encode_prompt(tokenizer, prompt, chat=chat, device=next(model.parameters()).device)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    out = model.generate(**enc, pad_token_id=pad, **generate_kwargs)
    return tokenizer.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True).strip()


def answer(model, tokenizer, prompt: str, max_new_tokens: int = 32, chat: bool = True) -> str:
    """Greedy answer of ``model`` to ``prompt``; through the chat template when the tokenizer has one."""
    return generate_reply(model, tokenizer, prompt, chat=chat, max_new_tokens=max_new_tokens, do_sample=False)
