"""Training text for distillation that needs no download: text the teacher writes itself, and prose that
Debian installs on every machine.

- **Teacher samples** (:func:`sample_teacher_text`): continuations the teacher samples from varied prompts
  (``DEFAULT_PROMPTS``, through the chat template when the tokenizer has one). This is the teacher's own
  distribution, the text a student fitted to it should match best (the SWAA authors' fine-tuning scripts
  train on the model's own outputs the same way). Reproducible: each prompt's samples come from their own
  seed, so the text does not depend on batching or on which prompts come before.
- **Debian prose** (:func:`debian_prose`): the licence texts in ``/usr/share/common-licenses`` (GPL 1-3,
  LGPL, GFDL, Apache 2.0, Artistic, BSD, MPL, CC0: about 260 kB of English legal prose), installed by
  Debian's ``base-files`` package, which every Debian and Ubuntu system has. Each licence allows verbatim
  copies of its own text; nothing of it is committed here, it is read on the machine at run time.

- **Token ids saved before** (:func:`load_token_ids`): a 1-D integer tensor saved with ``torch.save``, e.g.
  another run's ``train_ids.pt``, used as it is, so that several runs train on one sampling of the teacher.

Evaluate on a text of another source that neither of these contains: the shipped
``swaa/data/jargon_file_excerpt.txt`` (public domain) is what ``swaa distill`` uses by default.
"""

from __future__ import annotations

import glob
import gzip
import os
from collections.abc import Sequence

import torch

from swaa.validation import check_bool, check_int, check_number

__all__ = ["DEBIAN_PROSE", "DEFAULT_PROMPTS", "debian_prose", "load_token_ids", "sample_teacher_text"]

# where Debian's base-files package puts the common licence texts
DEBIAN_PROSE = ("/usr/share/common-licenses",)

# varied user turns: questions, explanations, stories, instructions, code, lists, letters; short, so the
# teacher's continuation is most of each sample
DEFAULT_PROMPTS = (
    "What is the capital of France?",
    "Explain how a rainbow forms.",
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "Give me three tips for learning a new language.",
    "Why is the sky blue?",
    "Summarise the causes of the First World War in a paragraph.",
    "Write a Python function that checks whether a number is prime.",
    "What are the health benefits of regular exercise?",
    "Describe the water cycle to a ten-year-old.",
    "Write a polite email asking a colleague to review a document.",
    "How does a refrigerator keep food cold?",
    "List the planets of the solar system with one fact about each.",
    "What is the difference between weather and climate?",
    "Write a haiku about autumn leaves.",
    "How do vaccines work?",
    "Translate 'good morning, how are you?' into Spanish and explain the grammar.",
    "What should I pack for a week-long hiking trip?",
    "Explain what an algorithm is, with an everyday example.",
    "Tell me about the history of the printing press.",
    "How can I improve my sleep?",
    "Write a recipe for a simple vegetable soup.",
    "What is photosynthesis?",
    "Compare cats and dogs as pets.",
    "Explain the rules of chess briefly.",
    "Once upon a time, in a village at the edge of a great forest,",
    "The most important thing I learned at university was",
    "Dear diary, today something unexpected happened.",
    "In the year 2150, cities will",
)


def _read(path: str) -> str:
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8", errors="replace") as f:
        return f.read()


def debian_prose(sources: Sequence[str] = DEBIAN_PROSE) -> str:
    """The text of every regular file under ``sources`` (files, folders or glob patterns; ``.gz`` files
    decompressed), each file once (``GPL`` is a link to ``GPL-3``), in sorted path order, separated by blank
    lines.

    Args:
        sources (Sequence[str]): where to read. Default: ``DEBIAN_PROSE`` (``/usr/share/common-licenses``).

    Raises:
        FileNotFoundError: nothing readable there (on Debian/Ubuntu, ``apt-get install base-files``).
    """
    if isinstance(sources, (str, os.PathLike)):
        sources = [sources]
    paths = set()
    for source in sources:
        source = os.fspath(source)
        matches = glob.glob(source) or ([source] if os.path.exists(source) else [])
        for match in matches:
            if os.path.isdir(match):
                for root, _, files in os.walk(match, followlinks=False):
                    paths.update(os.path.join(root, name) for name in files)
            else:
                paths.add(match)
    texts, seen = [], set()
    for path in sorted(paths):
        real = os.path.realpath(path)
        if real in seen or not os.path.isfile(real):
            continue
        seen.add(real)
        text = _read(real).strip()
        if text:
            texts.append(text)
    if not texts:
        raise FileNotFoundError(
            f"no text found in {list(sources)} (Debian's base-files package installs /usr/share/common-licenses)"
        )
    return "\n\n".join(texts)


def load_token_ids(path, vocab_size: int, what: str = "token ids") -> torch.Tensor:
    """Token ids saved with ``torch.save`` (e.g. a ``swaa distill`` run's ``train_ids.pt``), checked.

    Args:
        path (str | os.PathLike): the file; read with ``weights_only=True`` (no code runs).
        vocab_size (int): the model's vocabulary size; every id must be in ``[0, vocab_size)``.
        what (str): how errors name the file's source (the CLI passes ``"--data"``). Default: ``"token ids"``.

    Returns:
        torch.Tensor: int64 ``[N]`` on the CPU, the saved ids unchanged.

    Raises:
        ValueError: not a tensor file, not a non-empty 1-D integer tensor, or an id outside the vocabulary.
    """
    check_int("vocab_size", vocab_size, minimum=1)
    path = os.fspath(path)
    try:
        ids = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch.load raises pickle's, zipfile's and its own errors alike
        message = " ".join(str(err).split())[:200]
        raise ValueError(f"{what} {path!r}: not a tensor saved with torch.save ({message})") from None
    if not isinstance(ids, torch.Tensor):
        raise ValueError(f"{what} {path!r}: holds a {type(ids).__name__}, not a tensor of token ids")
    if (
        ids.dim() != 1
        or ids.numel() == 0
        or ids.dtype.is_floating_point
        or ids.is_complex()
        or ids.dtype == torch.bool
    ):
        raise ValueError(
            f"{what} {path!r}: needs a non-empty 1-D integer tensor of token ids, got {ids.dtype} of shape "
            f"{list(ids.shape)}"
        )
    low, high = int(ids.min()), int(ids.max())
    if low < 0 or high >= vocab_size:
        bad = low if low < 0 else high
        raise ValueError(
            f"{what} {path!r}: token id {bad} is outside the vocabulary of {vocab_size} (ids 0 to "
            f"{vocab_size - 1}); were these ids made with another tokenizer?"
        )
    return ids.long()


def _eos_ids(model, tokenizer) -> list[int]:
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if eos is None:
        eos = getattr(model.config, "eos_token_id", None)
    if eos is None and tokenizer is not None:
        eos = tokenizer.eos_token_id
    return [] if eos is None else list(eos) if isinstance(eos, (list, tuple)) else [int(eos)]


def _prompt_ids(prompt, tokenizer, chat: bool) -> torch.Tensor:
    if isinstance(prompt, str):
        if tokenizer is None:
            raise ValueError("prompts given as text need the teacher's tokenizer (tokenizer=...)")
        if chat and getattr(tokenizer, "chat_template", None):
            text = tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
            )
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        else:
            ids = tokenizer(prompt)["input_ids"]
        ids = torch.tensor(ids, dtype=torch.long)
    else:
        ids = torch.as_tensor(prompt, dtype=torch.long).reshape(-1)
    if ids.numel() == 0:
        raise ValueError(f"prompt {prompt!r} has no tokens")
    return ids


@torch.no_grad()
def sample_teacher_text(
    teacher,
    prompts: Sequence = DEFAULT_PROMPTS,
    tokenizer=None,
    samples_per_prompt: int = 4,
    max_new_tokens: int = 256,
    temperature: float = 1.0,
    top_p: float = 1.0,
    seed: int = 0,
    chat: bool = True,
    progress: bool = True,
) -> torch.Tensor:
    """Text the teacher writes: ``samples_per_prompt`` sampled continuations of each prompt, as one running
    token stream ``[N]`` (prompt + continuation, each sample ending at its first end-of-sequence token or
    after ``max_new_tokens``, then an end-of-sequence token), ready for :func:`swaa.convert.windows.split_windows`.

    Args:
        teacher (PreTrainedModel): the model whose distribution the text follows.
        prompts (Sequence[str | Sequence[int]]): text (needs ``tokenizer``) or token ids. Default:
            ``DEFAULT_PROMPTS``.
        tokenizer: the teacher's tokenizer, for prompts given as text. Default: None.
        samples_per_prompt (int): continuations per prompt (one ``generate`` call each). Default: 4.
        max_new_tokens (int): longest continuation. Default: 256.
        temperature (float): sampling temperature (> 0). Default: 1.0 (the teacher's own distribution).
        top_p (float): nucleus sampling threshold in (0, 1]. Default: 1.0 (off). ``top_k`` is off.
        seed (int): prompt ``i`` samples after ``torch.manual_seed(seed * 1_000_003 + i)``; the caller's
            random state is left as it was. Default: 0.
        chat (bool): put text prompts through the tokenizer's chat template when it has one. Default: True.
        progress (bool): a progress bar over the prompts. Default: True.

    Returns:
        torch.Tensor: int64 ``[N]`` on the CPU.
    """
    from tqdm.auto import tqdm

    check_int("samples_per_prompt", samples_per_prompt, minimum=1)
    check_int("max_new_tokens", max_new_tokens, minimum=1)
    check_number("temperature", temperature, positive=True)
    check_number("top_p", top_p, positive=True)
    if top_p > 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")
    check_int("seed", seed, minimum=0)
    check_bool("chat", chat)
    if isinstance(prompts, str) or not len(prompts):
        raise TypeError("prompts must be a non-empty sequence of prompts (text or token ids)")
    encoded = [_prompt_ids(p, tokenizer, chat) for p in prompts]  # every prompt checked before sampling
    eos = _eos_ids(teacher, tokenizer)
    pad = eos[0] if eos else 0
    device = next(teacher.parameters()).device
    was_training = teacher.training
    teacher.eval()
    pieces = []
    devices = [device] if device.type == "cuda" else []
    try:
        for i, ids in enumerate(tqdm(encoded, desc="sampling the teacher", disable=not progress)):
            with torch.random.fork_rng(devices=devices):
                torch.manual_seed(seed * 1_000_003 + i)
                out = teacher.generate(
                    ids[None].to(device),
                    attention_mask=torch.ones(1, ids.numel(), dtype=torch.long, device=device),
                    do_sample=True,
                    temperature=float(temperature),
                    top_p=float(top_p),
                    top_k=0,
                    max_new_tokens=max_new_tokens,
                    num_return_sequences=samples_per_prompt,
                    pad_token_id=pad,
                    eos_token_id=eos or None,
                )
            for row in out[:, ids.numel() :].cpu():
                new = row.tolist()
                ends = [j for j, t in enumerate(new) if t in eos]
                new = new[: ends[0]] if ends else new
                pieces.append(torch.cat([ids, torch.tensor(new + eos[:1], dtype=torch.long)]))
    finally:
        teacher.train(was_training)
    return torch.cat(pieces)
