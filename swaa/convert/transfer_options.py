"""The scalar options of attention transfer: defaults and checks, in pure Python so that the CLI and the
demo read the defaults and refuse bad flags without loading torch or any weights."""

from __future__ import annotations

from swaa.validation import check_int, check_number

__all__ = ["DEFAULT_LR", "DEFAULT_STEPS", "TRAIN_CHOICES", "check_transfer_options"]

# AdamW steps per converted layer and learning rate: attention_transfer's defaults and the flags'
DEFAULT_STEPS = 300
DEFAULT_LR = 1e-3
# which parameters of a converted layer train: all, or only those not copied from the softmax attention
TRAIN_CHOICES = ("all", "new")


def check_transfer_options(steps=DEFAULT_STEPS, lr=DEFAULT_LR, train="all", batch_size=1) -> None:
    """Refuse bad scalar options of :func:`attention_transfer` (also used by the CLI and the demo
    before they load any weights)."""
    check_int("steps", steps, minimum=1)
    check_number("lr", lr, positive=True)
    if train not in TRAIN_CHOICES:
        raise ValueError(f"train must be one of {TRAIN_CHOICES}, got {train!r}")
    check_int("batch_size", batch_size, minimum=1)
