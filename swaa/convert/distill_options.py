"""The scalar options of distillation: defaults and checks, in pure Python so that ``swaa distill`` refuses
bad flags before it imports torch or loads any weights (as ``transfer_options`` does for attention
transfer)."""

from __future__ import annotations

from swaa.validation import check_bool, check_int, check_number

__all__ = [
    "DEFAULTS",
    "RESUMABLE_WITH_OTHER",
    "SCHEDULES",
    "TRAIN_CHOICES",
    "check_distill_options",
    "check_global_batch",
]

# which parameters of the student train: the converted layers only, or every parameter
TRAIN_CHOICES = ("converted", "all")
# learning-rate schedules (transformers' names), after ``warmup_steps`` of linear warm-up
SCHEDULES = ("constant", "linear", "cosine")

# distill()'s defaults and the CLI flags'; ``batch_size`` is the global batch (windows per optimizer step,
# over all processes and accumulation steps), so a run means the same thing on 1 GPU or 8
DEFAULTS = {
    "window": 256,
    "steps": 200,
    "lr": 1e-4,
    "batch_size": 8,
    "gradient_accumulation_steps": 1,
    "kl_weight": 1.0,
    "ce_weight": 0.0,
    "temperature": 1.0,
    "train": "converted",
    "lora_rank": 0,
    "lora_alpha": None,
    "schedule": "cosine",
    "warmup_steps": 0,
    "eval_every": 50,
    "eval_windows": 8,
    "save_every": 50,
    "save_total_limit": 2,
    "log_every": 10,
    "seed": 0,
    "bf16": False,
    # a time budget: stop after the first optimizer step that ends this many minutes after training began
    # (None: none); not part of what a run is, so a resumed run may give another
    "max_minutes": None,
}
# options that a resumed run may change (swaa distill compares the others with run.json's)
RESUMABLE_WITH_OTHER = ("max_minutes",)


def _non_negative(name, value):
    check_number(name, value)
    if value < 0:
        raise ValueError(f"{name} must be a non-negative number, got {value!r}")
    return value


def check_distill_options(**options) -> dict:
    """``DEFAULTS`` updated with ``options``, every value checked; a TypeError/ValueError names the option.

    Unknown names are refused (a misspelt option must not fall back to its default unnoticed).
    """
    unknown = sorted(set(options) - set(DEFAULTS))
    if unknown:
        raise TypeError(f"unknown distillation options {unknown}; known: {sorted(DEFAULTS)}")
    o = {**DEFAULTS, **options}
    check_int("window", o["window"], minimum=2)
    check_int("steps", o["steps"], minimum=1)
    check_number("lr", o["lr"], positive=True)
    check_int("batch_size", o["batch_size"], minimum=1)
    check_int("gradient_accumulation_steps", o["gradient_accumulation_steps"], minimum=1)
    _non_negative("kl_weight", o["kl_weight"])
    _non_negative("ce_weight", o["ce_weight"])
    if o["kl_weight"] == 0 and o["ce_weight"] == 0:
        raise ValueError("kl_weight and ce_weight are both 0: the loss would be 0; give one of them > 0")
    check_number("temperature", o["temperature"], positive=True)
    if o["train"] not in TRAIN_CHOICES:
        raise ValueError(f"train must be one of {TRAIN_CHOICES}, got {o['train']!r}")
    check_int("lora_rank", o["lora_rank"], minimum=0)
    check_number("lora_alpha", o["lora_alpha"], positive=True, allow_none=True)
    if o["lora_alpha"] is not None and o["lora_rank"] == 0:
        raise ValueError("lora_alpha needs lora_rank >= 1 (lora_rank=0 adds no adapters)")
    if o["lora_rank"] and o["train"] == "all":
        raise ValueError("lora_rank >= 1 adds adapters to the layers that train='all' already trains whole")
    if o["schedule"] not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {o['schedule']!r}")
    check_int("warmup_steps", o["warmup_steps"], minimum=0)
    if o["warmup_steps"] >= o["steps"]:
        raise ValueError(f"warmup_steps must be < steps={o['steps']}, got {o['warmup_steps']}")
    check_int("eval_every", o["eval_every"], minimum=1, allow_none=True)
    check_int("eval_windows", o["eval_windows"], minimum=1, allow_none=True)
    check_int("save_every", o["save_every"], minimum=1)
    check_int("save_total_limit", o["save_total_limit"], minimum=1, allow_none=True)
    check_int("log_every", o["log_every"], minimum=1)
    check_int("seed", o["seed"], minimum=0)
    check_bool("bf16", o["bf16"])
    check_number("max_minutes", o["max_minutes"], positive=True, allow_none=True)
    return o


def check_global_batch(batch_size: int, gradient_accumulation_steps: int, world_size: int) -> int:
    """Windows per process and forward pass: ``batch_size`` split over ``world_size`` processes and
    ``gradient_accumulation_steps``; refused unless it divides evenly (an uneven split would change what a
    step averages over, so a run on 2 GPUs would not be the run on 1)."""
    check_int("world_size", world_size, minimum=1)
    parts = world_size * gradient_accumulation_steps
    if batch_size % parts:
        raise ValueError(
            f"batch_size={batch_size} (windows per optimizer step, all processes together) must be a multiple "
            f"of processes x gradient_accumulation_steps = {world_size} x {gradient_accumulation_steps} = {parts}"
        )
    return batch_size // parts
