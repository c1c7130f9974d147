"""End-to-end distillation: fit the hybrid's next-token distribution to the original's, on transformers'
``Trainer``.

Attention transfer (:mod:`swaa.convert.transfer`) fits each converted layer alone, on the original's
inputs; it cannot correct errors that compound through many converted layers. Distillation trains the
whole hybrid end to end (LoLCATs' and Liger's second stage): the student's logits are fitted to the
teacher's distribution (KL divergence at a temperature, optionally plus next-token cross-entropy), training
the converted layers and, optionally, low-rank adapters (PEFT's LoRA) on everything else.

The loop is transformers' ``Trainer`` (``DistillTrainer``, :func:`distill_trainer_class`, only adds the loss, a sequential sampler and
a held-out evaluation), so it brings what ``Trainer`` has: a progress bar, logging, checkpoints that a run
resumes from after Ctrl-C or a killed process, and data parallelism through ``accelerate launch`` or
``torchrun`` with no change of code.
"""

from __future__ import annotations

import functools
import json
import math
import os
import re
import time

import torch
from torch import nn

from swaa.convert.distill_options import check_distill_options, check_global_batch
from swaa.convert.record import hybrid_record
from swaa.convert.swap import decoder_layers
from swaa.convert.windows import split_windows

__all__ = [
    "distill",
    "distill_trainer_class",
    "distill_loss",
    "heldout_metrics",
    "kl_divergence",
    "last_checkpoint",
]

_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
# written last into a Trainer checkpoint: a folder without it was cut off while it was being written
_COMPLETE_MARK = "trainer_state.json"
# the time budget's clock (seconds); a module attribute so that tests can run it faster than the wall
_clock = time.monotonic


# rows of [rows, vocab] float32 that the KL takes at a time: ~128 MB per temporary
_KL_CHUNK_BYTES = 1 << 27


def _kl_terms(s: torch.Tensor, t: torch.Tensor, temperature: float):
    log_s = torch.log_softmax(s.float() / temperature, dim=-1)
    log_t = torch.log_softmax(t.float() / temperature, dim=-1)
    return log_s, log_t


def _pointwise_kl(log_s: torch.Tensor, log_t: torch.Tensor) -> torch.Tensor:
    """KL(teacher || student)'s terms, one per position and vocabulary entry."""
    return log_t.exp() * (log_t - log_s)


class _RowChunkedKL(torch.autograd.Function):
    """Sum over rows of KL(softmax(t / tau) || softmax(s / tau)) for ``[rows, vocab]`` logits, in float32,
    ``chunk`` rows at a time; backward recomputes each chunk's softmaxes. It keeps only the two inputs for
    backward, where the plain formula keeps several float32 copies of the whole ``[B, T, vocab]`` (~0.8 GB
    each for SmolLM2 at 8 x 512 tokens). The teacher gets no gradient."""

    @staticmethod
    def forward(ctx, s, t, temperature, chunk):
        total = torch.zeros((), dtype=torch.float32, device=s.device)
        for i in range(0, s.shape[0], chunk):
            log_s, log_t = _kl_terms(s[i : i + chunk], t[i : i + chunk], temperature)
            total += _pointwise_kl(log_s, log_t).sum()
        ctx.save_for_backward(s, t)
        ctx.temperature, ctx.chunk = temperature, chunk
        return total

    @staticmethod
    def backward(ctx, grad):
        s, t = ctx.saved_tensors
        out = torch.empty_like(s)
        for i in range(0, s.shape[0], ctx.chunk):
            log_s, log_t = _kl_terms(s[i : i + ctx.chunk], t[i : i + ctx.chunk], ctx.temperature)
            # d/ds of KL(p_t || p_s), p = softmax(logits / tau): (p_s - p_t) / tau
            out[i : i + ctx.chunk] = ((log_s.exp() - log_t.exp()) * (grad / ctx.temperature)).to(s.dtype)
        return out, None, None, None


def kl_divergence(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0, chunk_rows=None
) -> torch.Tensor:
    """Mean over positions of KL(teacher || student) at ``temperature``, in float32, for ``[..., vocab]``
    logits. A teacher without gradient (the distillation case) goes through a row-chunked form that keeps no
    full-vocabulary float32 copy for backward (``chunk_rows`` rows at a time, default ~128 MB of float32 per
    temporary); equal to the plain formula (tested, values and gradients)."""
    vocab = student_logits.shape[-1]
    if teacher_logits.requires_grad:
        return _pointwise_kl(*_kl_terms(student_logits, teacher_logits, temperature)).sum(-1).mean()
    s = student_logits.reshape(-1, vocab)
    t = teacher_logits.detach().reshape(-1, vocab)
    chunk = chunk_rows or max(1, _KL_CHUNK_BYTES // (4 * vocab))
    return _RowChunkedKL.apply(s, t, float(temperature), int(chunk)) / max(s.shape[0], 1)


def distill_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    input_ids: torch.Tensor,
    kl_weight: float = 1.0,
    ce_weight: float = 0.0,
    temperature: float = 1.0,
) -> torch.Tensor:
    """``kl_weight * tau^2 * KL(teacher || student)`` at temperature ``tau`` (mean over every position of
    every window, :func:`kl_divergence`) ``+ ce_weight * `` next-token cross-entropy on ``input_ids``, in
    float32.

    Args:
        student_logits, teacher_logits (torch.Tensor): ``[B, T, vocab]``.
        input_ids (torch.Tensor): ``[B, T]``, the windows both models read.
    """
    loss = student_logits.new_zeros((), dtype=torch.float32)
    if kl_weight:
        kl = kl_divergence(student_logits, teacher_logits, temperature)
        loss = loss + kl_weight * temperature**2 * kl
    if ce_weight:
        s = student_logits[:, :-1].float()
        ce = nn.functional.cross_entropy(s.reshape(-1, s.shape[-1]), input_ids[:, 1:].reshape(-1))
        loss = loss + ce_weight * ce
    return loss


@torch.no_grad()
def heldout_metrics(student, teacher, windows: torch.Tensor, batch_size: int = 1) -> dict:
    """Perplexity of student and teacher on held-out ``windows`` ``[N, T]`` (each from an empty context, the
    ``T - 1`` next-token predictions of each window) and the mean per-token KL(teacher || student).

    Returns:
        dict: ``ppl``, ``teacher_ppl``, ``ppl_ratio`` (student / teacher), ``kl``.
    """
    device = next(student.parameters()).device
    nll_s = nll_t = kl = 0.0
    count = positions = 0
    for start in range(0, len(windows), batch_size):
        ids = windows[start : start + batch_size].to(device)
        s = torch.log_softmax(student(input_ids=ids, use_cache=False).logits.float(), dim=-1)
        t = torch.log_softmax(teacher(input_ids=ids, use_cache=False).logits.float(), dim=-1)
        target = ids[:, 1:, None]
        nll_s += -s[:, :-1].gather(-1, target).sum().item()
        nll_t += -t[:, :-1].gather(-1, target).sum().item()
        kl += (t.exp() * (t - s)).sum().item()
        count += target.numel()
        positions += ids.numel()
    ppl, teacher_ppl = math.exp(nll_s / count), math.exp(nll_t / count)
    return {"ppl": ppl, "teacher_ppl": teacher_ppl, "ppl_ratio": ppl / teacher_ppl, "kl": kl / positions}


def last_checkpoint(output_dir) -> str | None:
    """The complete ``checkpoint-<step>`` folder of ``output_dir`` with the highest step (None if none):
    complete means its ``trainer_state.json``, which ``Trainer`` writes last, is there."""
    if not os.path.isdir(output_dir):
        return None
    steps = []
    for name in os.listdir(output_dir):
        m = _CHECKPOINT.match(name)
        if m and os.path.isfile(os.path.join(output_dir, name, _COMPLETE_MARK)):
            steps.append(int(m.group(1)))
    return os.path.join(output_dir, f"checkpoint-{max(steps)}") if steps else None


class _Windows(torch.utils.data.Dataset):
    def __init__(self, windows: torch.Tensor):
        self.windows = windows

    def __len__(self):
        return len(self.windows)

    def __getitem__(self, i):
        return {"input_ids": self.windows[i]}


@functools.cache
def distill_trainer_class():
    from transformers import Trainer

    class DistillTrainer(Trainer):
        """``Trainer`` whose loss is :func:`distill_loss` against a frozen ``teacher``.

        Windows are taken in order (the order ``distill`` shuffled them into, with its seed): every
        process count then sees the same windows in each global batch, and a resumed run skips exactly
        the batches it had done. ``evaluate`` reports held-out perplexity and KL
        (:func:`heldout_metrics`) instead of the training loss.
        """

        def __init__(self, *args, teacher, kl_weight, ce_weight, temperature, **kwargs):
            super().__init__(*args, **kwargs)
            self.teacher = teacher.to(self.args.device).eval()
            self.loss_options = {"kl_weight": kl_weight, "ce_weight": ce_weight, "temperature": temperature}
            # the loss is a per-batch mean: Trainer divides it by the accumulation steps itself, and DDP
            # averages it over processes (no token counts handed in or multiplied back)
            self.model_accepts_loss_kwargs = False
            self.loss_is_scaled_for_ga = False

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            ids = inputs["input_ids"]
            outputs = model(input_ids=ids, use_cache=False)
            with torch.no_grad():
                teacher_logits = self.teacher(input_ids=ids, use_cache=False).logits
            loss = distill_loss(outputs.logits, teacher_logits, ids, **self.loss_options)
            return (loss, outputs) if return_outputs else loss

        def _get_train_sampler(self, train_dataset=None):
            return torch.utils.data.SequentialSampler(
                train_dataset if train_dataset is not None else self.train_dataset
            )

        def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix="eval"):
            dataset = eval_dataset if eval_dataset is not None else self.eval_dataset
            model = self.model
            was_training = model.training
            model.eval()
            try:
                # every process scores the whole (small) held-out set; no gathering needed
                metrics = heldout_metrics(
                    model, self.teacher, dataset.windows, self.args.per_device_eval_batch_size
                )
            finally:
                model.train(was_training)
            metrics = {f"{metric_key_prefix}_{k}": v for k, v in metrics.items()}
            self.log(metrics)
            self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
            return metrics

    return DistillTrainer


def _time_budget(max_minutes: float):
    """A ``TrainerCallback`` that stops training at the end of the first optimizer step that ends
    ``max_minutes`` or more after training began (this call's training: a resumed run's budget starts
    afresh), and has that step checkpointed, so calling again continues from it."""
    from transformers import TrainerCallback

    class TimeBudget(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            self.start = _clock()

        def on_step_end(self, args, state, control, **kwargs):
            stop = _clock() - self.start >= 60 * max_minutes
            if args.world_size > 1:
                # every process stops at the same step: the first process's clock decides for all (two
                # clocks could disagree on which step crossed, and the others would wait at the next one)
                flag = torch.tensor([float(stop)], device=args.device)
                torch.distributed.broadcast(flag, src=0)
                stop = bool(flag.item())
            if stop:
                control.should_training_stop = True
                control.should_save = True

    return TimeBudget()


def _check_models(teacher, student) -> list[int]:
    record = hybrid_record(getattr(student, "config", None))
    if not record or not record["linear_layers"]:
        raise ValueError("student must be a hybrid with converted layers (see swaa.convert_to_hybrid)")
    for name in ("num_hidden_layers", "hidden_size", "vocab_size"):
        t, s = getattr(teacher.config, name, None), getattr(student.config, name, None)
        if t != s:
            raise ValueError(f"teacher and student differ in {name}: {t} vs {s}")
    if teacher is student:
        raise ValueError(
            "teacher and student are the same object; distil into a converted copy of the teacher"
        )
    return list(record["linear_layers"])


def _lora_targets(student, converted_prefixes) -> list[str]:
    # every Linear outside the converted attention layers and the output head: the softmax layers' q/k/v/o
    # projections and every MLP
    names = []
    for name, module in student.named_modules():
        if isinstance(module, nn.Linear) and not name.startswith(converted_prefixes) and name != "lm_head":
            names.append(name)
    return names


def _trim(windows: torch.Tensor, batch_size: int, what: str) -> torch.Tensor:
    if len(windows) < batch_size:
        raise ValueError(f"{what}: {len(windows)} windows, fewer than batch_size={batch_size}")
    return windows[: len(windows) // batch_size * batch_size]


def distill(
    teacher,
    student,
    train_ids: torch.Tensor,
    eval_ids: torch.Tensor | None = None,
    *,
    output_dir,
    resume: bool = True,
    progress: bool = True,
    callbacks=None,
    **options,
) -> dict:
    """Train ``student`` (a hybrid) to give ``teacher``'s next-token distribution, with ``Trainer``.

    Each step takes ``batch_size`` windows of ``train_ids`` and minimises :func:`distill_loss`: KL(teacher ||
    student) at ``temperature`` (times ``temperature**2``), weighted ``kl_weight``, plus ``ce_weight`` times the
    next-token cross-entropy on the window itself. AdamW without weight decay, gradients clipped at norm 1.

    Args:
        teacher (PreTrainedModel): the model before conversion; frozen (moved to the training device, put in
            eval mode).
        student (PreTrainedModel): the hybrid (``convert_to_hybrid`` of a copy of the teacher, usually after
            ``attention_transfer``), trained in place.
        train_ids (torch.Tensor): a running text ``[N]`` (cut into windows of ``window`` tokens) or windows
            ``[num_windows, T]``. Shuffled once with ``seed``, trimmed to whole global batches, and gone
            through in that order, repeated until ``steps``. See :mod:`swaa.convert.distill_data` for text
            that needs no download.
        eval_ids (torch.Tensor | None): held-out text, ``[N]`` or windows, from another source than
            ``train_ids`` (never trained on). Every ``eval_every`` steps, and before the first and after the
            last, its first ``eval_windows`` windows are scored: student and teacher perplexity, their ratio,
            KL (logged as ``eval_ppl``, ``eval_teacher_ppl``, ``eval_ppl_ratio``, ``eval_kl``). Default: None.
        output_dir (str | os.PathLike): where ``Trainer`` writes ``checkpoint-<step>`` folders (every
            ``save_every`` steps and at the end, the last ``save_total_limit`` kept).
        resume (bool): start from the last complete checkpoint in ``output_dir`` when there is one (an
            interrupted run then loses only the steps after it; a finished run trains no more). False: start
            afresh, refused if ``output_dir`` holds checkpoints. Default: True.
        progress (bool): Trainer's progress bar and log lines. Default: True.
        callbacks (list[TrainerCallback] | None): passed to ``Trainer``. Default: None.
        **options: the scalar options, defaults in :data:`swaa.convert.distill_options.DEFAULTS`:
            ``window`` (256) tokens per window; ``steps`` (200) optimizer steps; ``lr`` (1e-4); ``batch_size``
            (8) windows per optimizer step over all processes and accumulation steps (a multiple of
            processes x ``gradient_accumulation_steps`` (1)); ``kl_weight`` (1.0), ``ce_weight`` (0.0),
            ``temperature`` (1.0); ``train`` (``"converted"``: the parameters of the converted layers;
            ``"all"``: every parameter); ``lora_rank`` (0: no adapters; r >= 1: LoRA adapters of rank r on
            every other Linear but the output head, merged into the weights at the end, needs ``peft``) and
            ``lora_alpha`` (None: 2 * rank); ``schedule`` (``"cosine"``, ``"linear"``, ``"constant"``) after
            ``warmup_steps`` (0); ``eval_every`` (50; None: only before and after), ``eval_windows`` (8;
            None: all); ``save_every`` (50), ``save_total_limit`` (2; None: keep all); ``log_every`` (10);
            ``seed`` (0: the shuffle, the adapters' initialisation, Trainer's seed); ``bf16`` (False: bf16
            autocast where supported); ``max_minutes`` (None: no time budget; M > 0: training stops at the
            end of the first optimizer step that ends M minutes or more after this call's training began,
            evaluation and checkpoint writing included; that step is checkpointed and scored on
            ``eval_ids`` as a last step is, and the report says ``stopped_early``. The learning-rate
            schedule stays sized for ``steps``: a stopped run has not annealed. Calling again with the same
            ``output_dir`` continues from the stop, with a budget of its own).

    Returns:
        dict: ``steps`` (global steps done), ``stopped_early`` (True when ``max_minutes`` stopped it before
        ``steps``), ``max_minutes``, ``resumed_from`` (checkpoint path or None), ``train_windows``,
        ``tokens`` (training tokens seen over the whole run, all processes), ``trained_parameters``,
        ``losses`` (``[[step, loss], ...]`` as logged), ``eval`` (``[{step, ppl, teacher_ppl, ppl_ratio, kl}]``,
        in order; empty without ``eval_ids``), ``output_dir``.

    Every option, the models and the data are checked before anything trains (or, with ``lora_rank``, before
    ``peft`` is imported). Data-parallel: run the same script under ``accelerate launch`` or ``torchrun``;
    every process builds the same models and data, the global batch is split among them, and the result
    equals a single process with the same ``batch_size`` (up to float rounding of the gradient all-reduce).
    An interrupted call leaves the student as the last step left it (adapters unmerged and removed); the
    checkpoint has the run.
    """
    o = check_distill_options(**options)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    per_device = check_global_batch(o["batch_size"], o["gradient_accumulation_steps"], world_size)
    converted = _check_models(teacher, student)
    from swaa.validation import check_bool

    check_bool("resume", resume)
    check_bool("progress", progress)
    windows = split_windows(train_ids, o["window"])
    generator = torch.Generator().manual_seed(o["seed"])
    windows = _trim(windows[torch.randperm(len(windows), generator=generator)], o["batch_size"], "train_ids")
    held_out = None
    if eval_ids is not None:
        held_out = split_windows(eval_ids, o["window"], o["eval_windows"])
    output_dir = os.fspath(output_dir)
    checkpoint = last_checkpoint(output_dir) if resume else None
    if not resume and os.path.isdir(output_dir) and any(_CHECKPOINT.match(n) for n in os.listdir(output_dir)):
        raise ValueError(
            f"output_dir {output_dir!r} holds checkpoints of an earlier run; pass resume=True to continue it, "
            "or choose another output_dir"
        )
    done = False
    if checkpoint is not None:
        with open(os.path.join(checkpoint, _COMPLETE_MARK)) as f:
            reached = json.load(f)["global_step"]
        if reached > o["steps"]:
            raise ValueError(
                f"output_dir {output_dir!r}: its last checkpoint is at step {reached}, beyond steps={o['steps']}"
            )
        done = reached == o["steps"]
    if o["lora_rank"]:
        try:
            import peft
        except ImportError:
            raise ImportError("lora_rank >= 1 needs PEFT: pip install 'swaa[distill]'") from None
    from transformers import TrainingArguments
    from transformers.trainer_utils import set_seed

    layers = decoder_layers(student)
    converted_params = {id(p) for i in converted for p in layers[i].self_attn.parameters()}
    prefixes = tuple(
        n + "." for n, m in student.named_modules() if any(m is layers[i].self_attn for i in converted)
    )
    flags = {n: p.requires_grad for n, p in student.named_parameters()}
    use_cache, was_training = student.config.use_cache, student.training

    set_seed(o["seed"])
    for p in student.parameters():
        p.requires_grad_(o["train"] == "all" or id(p) in converted_params)
    model = student
    if o["lora_rank"]:
        config = peft.LoraConfig(
            r=o["lora_rank"],
            lora_alpha=o["lora_alpha"] if o["lora_alpha"] is not None else 2 * o["lora_rank"],
            lora_dropout=0.0,
            target_modules=_lora_targets(student, prefixes),
            # the converted layers train whole; saved with the adapters, so a checkpoint holds the run
            modules_to_save=[p[:-1] for p in prefixes],
        )
        model = peft.get_peft_model(student, config)
    finished = False
    try:
        student.config.use_cache = False
        model.train()
        trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
        eval_on = held_out is not None
        budget = [] if o["max_minutes"] is None else [_time_budget(o["max_minutes"])]
        args = TrainingArguments(
            output_dir=output_dir,
            max_steps=o["steps"],
            per_device_train_batch_size=per_device,
            per_device_eval_batch_size=per_device,
            gradient_accumulation_steps=o["gradient_accumulation_steps"],
            learning_rate=o["lr"],
            weight_decay=0.0,
            lr_scheduler_type=o["schedule"],
            warmup_steps=o["warmup_steps"],
            logging_strategy="steps",
            logging_steps=o["log_every"],
            # eval_every=None: scored before the first step and after the last only
            eval_strategy="steps" if eval_on else "no",
            eval_steps=(o["eval_every"] or o["steps"]) if eval_on else None,
            eval_on_start=eval_on and checkpoint is None,
            save_strategy="steps",
            save_steps=o["save_every"],
            save_total_limit=o["save_total_limit"],
            seed=o["seed"],
            bf16=o["bf16"],
            use_cpu=not torch.cuda.is_available(),
            report_to=[],
            disable_tqdm=not progress,
            remove_unused_columns=False,
            dataloader_drop_last=False,
        )
        trainer = distill_trainer_class()(
            model=model,
            args=args,
            train_dataset=_Windows(windows),
            eval_dataset=_Windows(held_out) if eval_on else None,
            callbacks=budget + list(callbacks or []),
            teacher=teacher,
            kl_weight=o["kl_weight"],
            ce_weight=o["ce_weight"],
            temperature=o["temperature"],
        )
        if done:
            # Trainer would take one more step from a checkpoint at max_steps: load it as it is instead
            from transformers import TrainerState

            trainer._load_from_checkpoint(checkpoint)
            trainer.state = TrainerState.load_from_json(os.path.join(checkpoint, _COMPLETE_MARK))
        else:
            trainer.train(resume_from_checkpoint=checkpoint)
        history = trainer.state.log_history
        if eval_on and not any(
            e.get("step") == trainer.state.global_step and "eval_ppl" in e for e in history
        ):
            trainer.evaluate()
        finished = True
    finally:
        if o["lora_rank"]:
            merged = model.merge_and_unload() if finished else model.unload()
            assert merged is student
        for n, p in student.named_parameters():
            p.requires_grad_(flags.get(n, False))
            p.grad = None
        student.config.use_cache = use_cache
        student.train(was_training)
    history = trainer.state.log_history
    return {
        "steps": trainer.state.global_step,
        "stopped_early": trainer.state.global_step < o["steps"],
        "max_minutes": o["max_minutes"],
        "resumed_from": checkpoint,
        "train_windows": len(windows),
        "tokens": trainer.state.global_step * o["batch_size"] * windows.shape[1],
        "trained_parameters": trained,
        "losses": [[e["step"], e["loss"]] for e in history if "loss" in e],
        "eval": [
            {"step": e["step"], **{k: e[f"eval_{k}"] for k in ("ppl", "teacher_ppl", "ppl_ratio", "kl")}}
            for e in history
            if "eval_ppl" in e
        ],
        "output_dir": output_dir,
    }
