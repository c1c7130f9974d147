"""The application's defaults, in one place: what ``swaa convert``, ``swaa demo`` and the demo function
use when a flag or argument is not given. The conversion API's own defaults stay with its functions
(:func:`swaa.convert.attention_transfer`'s steps and learning rate are imported from there)."""

from __future__ import annotations

from swaa.convert.transfer_options import DEFAULT_LR as TRANSFER_LR
from swaa.convert.transfer_options import DEFAULT_STEPS as TRANSFER_STEPS

__all__ = [
    "CACHE_TOKENS",
    "DEMO_KIND",
    "DEMO_LINEAR_LAYERS",
    "DEMO_MAX_WINDOWS",
    "DEMO_PROMPT",
    "DEMO_WINDOW",
    "DISTILL_KIND",
    "TRANSFER_LR",
    "TRANSFER_STEPS",
    "TRANSFER_WINDOW",
    "TRANSFER_WINDOWS",
]

# attention transfer from a text file: windows of this many tokens, this many of them
TRANSFER_WINDOW = 512
TRANSFER_WINDOWS = 16

# the demo: the last 4 layers become sliding-window GLA (a 64-token softmax window plus GLA over the rest)
# with the layer defaults: on text never trained on it keeps 1.03x the original's perplexity after
# attention transfer, plain GLA 1.27x (README, "The demo", says what the other choices measured);
# perplexity over 8 windows of 512 tokens; cache size at 4096 tokens
DEMO_KIND = "swa_gla"
DEMO_LINEAR_LAYERS = "last:4"
DEMO_WINDOW = 512
DEMO_MAX_WINDOWS = 8
DEMO_PROMPT = "What is the capital of France?"
CACHE_TOKENS = 4096

# swaa distill converts to sliding-window GLA unless --kind says otherwise: distilled on SmolLM2-135M it kept
# 15 of 30 layers at 1.03x the original's held-out perplexity and all 30 at 1.23x, where plain GLA gave
# 1.51x and 38x (README, "Distillation")
DISTILL_KIND = "swa_gla"
