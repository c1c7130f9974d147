"""Attention transfer: fit each converted layer to the softmax attention it replaced, layer by layer.

After :func:`swaa.convert.convert_to_hybrid`, a linear layer holds the pretrained q/k/v/o weights but
computes something else than the softmax attention did. Attention transfer (the first stage of LoLCATs,
Zhang et al., 2024) runs the original model over some text, records each replaced attention's input and
output, and trains the linear layer that took its place to give the same output from the same input: a
regression per layer, with the original's inputs (so the layers train independently and no error
propagates from one to the next during training). It needs no labels and a few minutes of CPU for a
small model; a fine-tune of the whole hybrid can follow.
"""

from __future__ import annotations

import torch

from swaa.convert.record import hybrid_record
from swaa.convert.transfer_options import DEFAULT_LR, DEFAULT_STEPS, check_transfer_options
from swaa.convert.windows import split_windows
from swaa.layers import GatedLinearAttention, LinearAttention

__all__ = ["PRETRAINED_PARTS", "attention_transfer"]

# the parts of a converted layer copied from the softmax attention (the rest is new)
PRETRAINED_PARTS = ("q_proj", "k_proj", "v_proj", "o_proj", "q_norm", "k_norm")


def _check(teacher, student):
    record = hybrid_record(student.config)
    if not record or not record["linear_layers"]:
        raise ValueError("student must be a hybrid with converted layers (see swaa.convert_to_hybrid)")
    indices = list(record["linear_layers"])
    for name in ("num_hidden_layers", "hidden_size"):
        t, s = getattr(teacher.config, name, None), getattr(student.config, name, None)
        if t != s:
            raise ValueError(f"teacher and student differ in {name}: {t} vs {s}")
    for i in indices:
        if isinstance(teacher.model.layers[i].self_attn, (LinearAttention, GatedLinearAttention)):
            raise ValueError(
                f"teacher layer {i} is already linear; the teacher must be the model before conversion"
            )
    return indices


def _capture(teacher, windows, indices, progress, record_device=None):
    """Each replaced attention's (hidden_states, position_embeddings) input and output, per window, kept on
    ``record_device`` (None: where the teacher computed them)."""

    def keep(t):
        return t.detach().to(record_device) if record_device is not None else t.detach()

    from tqdm.auto import tqdm

    records = {i: [] for i in indices}
    hooks = []

    for i in indices:

        def before(module, args, kwargs, i=i):
            hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            position = kwargs.get("position_embeddings")
            if position is not None:
                position = tuple(keep(t) for t in position)
            records[i].append({"hidden_states": keep(hidden), "position_embeddings": position})

        def after(module, args, kwargs, output, i=i):
            records[i][-1]["target"] = keep(output[0])

        attention = teacher.model.layers[i].self_attn
        hooks.append(attention.register_forward_pre_hook(before, with_kwargs=True))
        hooks.append(attention.register_forward_hook(after, with_kwargs=True))
    was_training = teacher.training
    try:
        teacher.eval()  # no dropout in what the student learns
        device = next(teacher.parameters()).device
        with torch.no_grad():
            for w in tqdm(windows, desc="attention transfer: recording the original", disable=not progress):
                teacher(w[None].to(device), use_cache=False)
    finally:
        for hook in hooks:
            hook.remove()
        teacher.train(was_training)
    return records


def _relative_error(layer, records: list) -> torch.Tensor:
    """|out - target|^2 / |target|^2 over one or more recorded windows, stacked as a batch."""
    hidden = torch.cat([r["hidden_states"] for r in records])
    position = records[0]["position_embeddings"]
    if position is not None:
        position = tuple(torch.cat([r["position_embeddings"][j] for r in records]) for j in range(2))
    out, _ = layer(hidden, position_embeddings=position)
    target = torch.cat([r["target"] for r in records]).float()
    return (out.float() - target).pow(2).mean() / target.pow(2).mean().clamp_min(1e-30)


def _mean_error(layer, records: list) -> float:
    return sum(_relative_error(layer, [r]).item() for r in records) / len(records)


def attention_transfer(
    teacher,
    student,
    input_ids: torch.Tensor,
    window: int = 512,
    max_windows: int | None = None,
    steps: int = DEFAULT_STEPS,
    lr: float = DEFAULT_LR,
    train: str = "all",
    batch_size: int = 1,
    record_device=None,
    progress: bool = True,
) -> dict:
    """Train each converted layer of ``student`` to reproduce the attention output of ``teacher``.

    For every layer index in the student's hybrid record, the teacher's attention at that index is run on
    ``input_ids`` (split into windows, each from an empty context) and its input and output recorded;
    the student's layer then takes ``steps`` AdamW steps (``batch_size`` windows each, cycling) on the
    relative mean squared error ``|out - target|^2 / |target|^2``. Only the converted layers' parameters
    change; the rest of the student, and the teacher, are untouched.

    Args:
        teacher (PreTrainedModel): the model before conversion (same family and shape).
        student (PreTrainedModel): the hybrid, e.g. ``convert_to_hybrid(copy.deepcopy(teacher), ...)``.
        input_ids (torch.Tensor): a running text ``[N]`` (cut into windows of ``window`` tokens) or windows
            ``[num_windows, T]``. Keep it apart from any text you evaluate on.
        window (int): tokens per window for ``[N]`` input. Default: 512.
        max_windows (int | None): use at most this many windows. Default: None (all).
        steps (int): optimizer steps per layer. Default: 300.
        lr (float): AdamW learning rate (no weight decay). Default: 1e-3.
        train (str): ``"all"`` parameters of each converted layer, or only the ``"new"`` ones (gates,
            feature maps, output norm and gate: what was not copied from the softmax attention,
            see ``PRETRAINED_PARTS``). Default: ``"all"``.
        batch_size (int): windows per step (the windows must have one length). Default: 1.
        record_device (str | torch.device | None): where the recordings wait for their layer's turn; ``"cpu"``
            keeps them off a GPU whose memory the models need (each layer's share moves to its device when
            it trains). Default: None (where the teacher ran).
        progress (bool): show progress bars. Default: True.

    Returns:
        dict: ``layers``: ``{index: {"before": e0, "after": e1, "restored": bool}}``, the relative error
        over all windows before and after training; a layer that did not improve gets its parameters back
        (``restored``), so none ends further from the original than it started; ``windows``; ``steps``.

    Memory: the recorded inputs and outputs of every converted layer for every window are kept
    (``2 * windows * layers * T * hidden`` values in the model's dtype) on ``record_device``.
    """
    from tqdm.auto import tqdm

    check_transfer_options(steps, lr, train, batch_size)
    indices = _check(teacher, student)
    windows = split_windows(input_ids, window, max_windows)
    trained_names = {}
    for i in indices:
        names = [n for n, _ in student.model.layers[i].self_attn.named_parameters()]
        trained_names[i] = [n for n in names if train == "all" or n.split(".")[0] not in PRETRAINED_PARTS]
        if not trained_names[i]:
            options = student.model.layers[i].self_attn.options
            raise ValueError(
                f"train='new' but layer {i} has no new parameters (options {options}); use train='all'"
            )
    records = _capture(teacher, windows, indices, progress, record_device)
    report = {"layers": {}, "windows": len(windows), "steps": steps, "batch_size": batch_size}
    for i in indices:
        layer = student.model.layers[i].self_attn
        first = next(layer.parameters())
        for record in records[i]:
            # inputs in the layer's device and dtype (a float32 teacher may teach a bf16 student)
            record["hidden_states"] = record["hidden_states"].to(first.device, first.dtype)
            record["target"] = record["target"].to(first.device)
            if record["position_embeddings"] is not None:
                record["position_embeddings"] = tuple(
                    t.to(first.device, first.dtype) for t in record["position_embeddings"]
                )
        trained = trained_names[i]
        flags = {n: p.requires_grad for n, p in layer.named_parameters()}
        grads = {n: p.grad for n, p in layer.named_parameters()}
        was_training = layer.training
        start, restored = None, True
        try:
            for n, p in layer.named_parameters():
                p.requires_grad_(n in trained)
            with torch.no_grad():
                before = _mean_error(layer, records[i])
                start = {n: p.detach().clone() for n, p in layer.named_parameters() if n in trained}
            optimizer = torch.optim.AdamW(
                [p for n, p in layer.named_parameters() if n in trained], lr=lr, weight_decay=0.0
            )
            layer.train()
            count = len(records[i])
            for step in tqdm(range(steps), desc=f"attention transfer: layer {i}", disable=not progress):
                batch = [records[i][(step * batch_size + j) % count] for j in range(batch_size)]
                loss = _relative_error(layer, batch)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
            layer.eval()
            with torch.no_grad():
                after = _mean_error(layer, records[i])
            # never leave a layer further from the original than it started (a too-large lr)
            restored = not after < before
        finally:
            with torch.no_grad():
                for n, p in layer.named_parameters():
                    if restored and start is not None and n in start:
                        p.copy_(start[n])  # no gain, or training did not finish: as it was
                    p.requires_grad_(flags[n])
                    p.grad = grads[n]
            layer.train(was_training)
        report["layers"][i] = {"before": before, "after": after, "restored": restored}
        records[i] = None  # free the recording of a finished layer
    return report
