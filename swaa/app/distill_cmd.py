"""``swaa distill``: end-to-end distillation of a hybrid from the model it came from, and the layer choice
(``--linear-layers auto:N``, ``--seed``) that ``swaa convert`` shares.

The parser imports no torch (``swaa --help`` stays fast); every flag is checked before a model is located
or a weight loads.

OUT holds one run and is what a rerun of the same command resumes from:

- ``run.json``: the flags and the chosen layers (with ``auto:N``'s scores), written when the run starts; a
  rerun with other flags is refused, so a resumed run is the run that was started;
- ``student-init/``: the hybrid before distillation (converted here, after attention transfer if asked),
  so a resumed run neither re-measures nor re-transfers;
- ``stages.json`` (when TEACHER is converted here): the held-out score (the windows and metrics of the
  distillation evals: student and teacher perplexity, their ratio, KL) right after conversion
  (``untrained``) and after attention transfer (``transferred``, None without ``--transfer-steps``),
  measured once, by the first process;
- ``train_ids.pt``: the training tokens (teacher samples and/or Debian prose and/or files), made once;
  ``--data`` of another run's ``train_ids.pt`` (any ``.pt`` file of a 1-D integer tensor) uses those ids as
  they are, checked against TEACHER's vocabulary before any weights load, so runs can share one sampling;
- ``checkpoints/checkpoint-<step>/``: Trainer's checkpoints; a run stopped by Ctrl-C or a killed process
  resumes from the last complete one and loses only the steps after it;
- at the end ``model/`` (the distilled hybrid and the tokenizer, loadable with ``from_pretrained`` after
  ``import swaa``) and ``report.json`` (losses, held-out perplexity over the run, tokens, wall time;
  ``stages``: ``{"untrained", "transferred", "distilled"}``, the first two from ``stages.json`` (None for
  a ``--student``), ``distilled`` the final eval; ``train_tokens_available``: the length of train_ids.pt).
  A run that ``--max-minutes`` stopped ends the same way (``report["stopped_early"]``, with the steps and
  tokens it did) and is as finished as any: a rerun is refused. ``--max-minutes`` is the one option left
  out of run.json's comparison, so a killed run may resume with another budget.

Data-parallel: ``accelerate launch --num_processes N -m swaa distill ...`` (or ``torchrun``) with the same
flags; ``--batch-size`` is the global batch, so the run is the same run on 1 or N processes. The first
process makes ``student-init`` and ``train_ids.pt`` while the others wait, then each loads them.
"""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

from swaa.app.defaults import TRANSFER_WINDOWS
from swaa.convert.distill_options import (
    DEFAULTS,
    RESUMABLE_WITH_OTHER,
    SCHEDULES,
    TRAIN_CHOICES,
    check_distill_options,
)

__all__ = [
    "DATA_SOURCES",
    "add_distill_parser",
    "add_seed_flag",
    "planned_layers",
    "convert_for_cli",
    "resolve_and_convert",
]

# --data: text the teacher samples, Debian's licence texts, token ids saved with torch.save (a .pt file),
# or a UTF-8 file (anything else)
DATA_SOURCES = ("teacher", "debian")
DEFAULT_DATA = ["teacher", "debian"]
IDS_SUFFIX = ".pt"
# the held-out scores right after conversion and after attention transfer, kept in OUT for a resumed run
STAGES_FILE = "stages.json"
TEACHER_SAMPLES = 4
TEACHER_TOKENS = 256
DEFAULT_SEED = 0

# run.json keys that must match for a rerun to resume (the others, e.g. --no-progress or --max-minutes, may
# change: a killed run may resume with another time budget)
_RUN_FLAGS = (
    "teacher", "student", "linear_layers", "kind", "option", "seed", "transfer_steps", "transfer_windows", "data",
    "teacher_samples", "teacher_tokens", "eval_text", "dtype",
    *(k for k in DEFAULTS if k not in RESUMABLE_WITH_OTHER),
)  # fmt: skip
_OPTION_FLAGS = {name: "--" + name.replace("_", "-") for name in DEFAULTS}


def add_seed_flag(p) -> None:
    """``--seed`` (conversion and ``auto:N``): the seed the new parameters are drawn after."""
    p.add_argument(
        "--seed",
        type=int,
        default=DEFAULT_SEED,
        help=f"seed of the new layers' initialisation and of auto:N's measurement, recorded in the config "
        f"(default: {DEFAULT_SEED})",
    )


def resolve_and_convert(model, linear_layers, kind, options, seed, text_ids=None, progress=True):
    """``swaa convert``'s and ``swaa distill``'s conversion: resolve ``linear_layers`` (``auto:N`` measured on
    ``text_ids``), convert ``model`` in place after ``torch.manual_seed(seed)``, record the choice in
    ``config.swaa_selection``; returns the selection record."""
    import torch

    from swaa.convert import convert_to_hybrid
    from swaa.convert.select import record_selection, resolve_linear_layers

    indices, selection = resolve_linear_layers(
        model, linear_layers, text_ids, kind, seed=seed, progress=progress, **options
    )
    torch.manual_seed(seed)
    convert_to_hybrid(model, indices, kind=kind, **options)
    record_selection(model.config, selection)
    return selection


def planned_layers(linear_layers, config):
    """``swaa convert``'s precheck of ``--linear-layers`` against the config: ``auto:N`` (N up to the
    model's depth) stands in as ``first:N``, so the kind and options are checked on as many layers before
    any weights load; any other selection is returned as it is."""
    from swaa.convert.select import auto_count

    n = auto_count(linear_layers)
    if n is None:
        return linear_layers
    if n > config.num_hidden_layers:
        raise IndexError(
            f"linear_layers: auto:{n} asks for {n} layers of a model with {config.num_hidden_layers} layers"
        )
    return f"first:{n}"


def convert_for_cli(model, args, options: dict, tokenizer=None, transfer_ids=None) -> dict:
    """``swaa convert``'s conversion of ``model`` (in place) from ``--linear-layers``, ``--kind``, the layer
    ``options`` (``--option``) and ``--seed``; ``auto:N`` measures on the ``--transfer-text`` windows when given, else on the Debian
    licence texts (see :mod:`swaa.convert.distill_data`). Prints and returns the selection record."""
    from swaa.app.evaluate import tokenize_text
    from swaa.convert.select import auto_count

    text_ids = None
    if auto_count(args.linear_layers) is not None:
        if transfer_ids is not None:
            text_ids = transfer_ids
        elif tokenizer is None:
            raise ValueError(
                "--linear-layers auto:N measures on text: SRC has no tokenizer; give --transfer-text"
            )
        else:
            from swaa.convert.distill_data import debian_prose

            text_ids = tokenize_text(tokenizer, debian_prose())
    selection = resolve_and_convert(model, args.linear_layers, args.kind, options, args.seed, text_ids)
    if selection["method"] == "auto":
        scores = ", ".join(f"{i}: {s:.3g}" for i, s in enumerate(selection["scores"]))
        print(f"auto layers by {selection['signal']} (per layer {scores}): {selection['layers']}")
    return selection


def check_selection_flags(linear_layers, seed) -> None:
    """``--linear-layers auto:N`` and ``--seed``, refused before any model is located."""
    from swaa.convert.select import auto_count
    from swaa.validation import check_int

    auto_count(linear_layers)
    try:
        check_int("seed", seed, minimum=0)
    except ValueError as err:
        raise ValueError(f"--{err}") from None


def _check_flags(args) -> dict:
    """Every flag of ``swaa distill`` that can be wrong; returns distill()'s options."""
    options = {name: getattr(args, name) for name in DEFAULTS}
    try:
        options = check_distill_options(**options)
    except (TypeError, ValueError) as err:
        # the options by their flags' names: "--lora-alpha needs --lora-rank >= 1"
        message = re.sub(
            r"\b(" + "|".join(_OPTION_FLAGS) + r")\b", lambda m: _OPTION_FLAGS[m.group(1)], str(err)
        )
        raise type(err)(message) from None
    from swaa.convert.distill_options import check_global_batch

    check_global_batch(options["batch_size"], options["gradient_accumulation_steps"], _world_size())
    if (args.student is None) == (args.linear_layers is None):
        raise ValueError("give either --student (a saved hybrid) or --linear-layers (convert TEACHER here)")
    if args.student is not None and (args.option or args.transfer_steps):
        raise ValueError("--option and --transfer-steps convert TEACHER; a --student is already converted")
    check_selection_flags(args.linear_layers, args.seed)
    if args.transfer_steps < 0:
        raise ValueError(f"--transfer-steps must be >= 0, got {args.transfer_steps}")
    if args.transfer_windows < 1:
        raise ValueError(f"--transfer-windows must be >= 1, got {args.transfer_windows}")
    for flag, value in (
        ("--teacher-samples", args.teacher_samples),
        ("--teacher-tokens", args.teacher_tokens),
    ):
        if value < 1:
            raise ValueError(f"{flag} must be >= 1, got {value}")
    data = args.data or DEFAULT_DATA
    files = [d for d in data if d not in DATA_SOURCES]
    for f in files:
        if not Path(f).expanduser().is_file():
            raise FileNotFoundError(f"--data: {f!r} is neither {' nor '.join(DATA_SOURCES)} nor a file")
    eval_text = Path(args.eval_text).expanduser() if args.eval_text else _default_eval_text()
    if not eval_text.is_file():
        raise FileNotFoundError(f"--eval-text: no such file: {str(eval_text)!r}")
    if any(Path(f).expanduser().resolve() == eval_text.resolve() for f in files):
        raise ValueError(
            f"--eval-text {str(eval_text)!r} is also a --data file: held-out text must not be trained on"
        )
    args.data, args.eval_text = data, str(eval_text)
    return options


def _is_ids_file(source: str) -> bool:
    return source not in DATA_SOURCES and Path(source).suffix.lower() == IDS_SUFFIX


def _check_id_files(args, vocab_size: int) -> None:
    """Every ``--data`` .pt file read and checked against TEACHER's vocabulary, before any weights load."""
    from swaa.convert.distill_data import load_token_ids

    for source in args.data:
        if _is_ids_file(source):
            load_token_ids(Path(source).expanduser(), vocab_size, "--data")


def _default_eval_text() -> Path:
    from swaa.app.demo import default_text_path

    return default_text_path()


def _vocab_size(config, tokenizer) -> int:
    # the ids the teacher's embedding takes (the tokenizer's size where a config has none)
    return getattr(config, "vocab_size", None) or len(tokenizer)


def _world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def _run_record(args) -> dict:
    return {k: getattr(args, k) for k in _RUN_FLAGS}


def _check_same_run(out: Path, record: dict) -> None:
    saved = json.loads((out / "run.json").read_text())
    differ = [k for k in _RUN_FLAGS if saved["flags"].get(k) != record[k]]
    if differ:
        shown = ", ".join(f"{k}: {saved['flags'].get(k)!r} then, {record[k]!r} now" for k in differ)
        raise ValueError(
            f"OUT {str(out)!r} holds a run started with other flags ({shown}); rerun it as it was, or choose a new OUT"
        )


def _training_ids(args, teacher, tokenizer):
    import torch

    from swaa.app.evaluate import tokenize_text
    from swaa.app.loading import read_text_file
    from swaa.convert.distill_data import debian_prose, load_token_ids, sample_teacher_text

    parts = []
    for source in args.data:
        if source == "teacher":
            parts.append(
                sample_teacher_text(
                    teacher,
                    tokenizer=tokenizer,
                    samples_per_prompt=args.teacher_samples,
                    max_new_tokens=args.teacher_tokens,
                    seed=args.seed,
                    progress=args.progress,
                )
            )
        elif _is_ids_file(source):
            # token ids as saved (e.g. another run's train_ids.pt): no tokenizer involved
            parts.append(
                load_token_ids(Path(source).expanduser(), _vocab_size(teacher.config, tokenizer), "--data")
            )
        else:
            text = debian_prose() if source == "debian" else read_text_file(source, "--data")
            parts.append(tokenize_text(tokenizer, text))
        print(f"training text: {source}: {parts[-1].numel()} tokens")
    return torch.cat(parts)


def _stage_metrics(student, teacher, held_out, options) -> dict:
    """The held-out score of a stage before distillation, as ``swaa.distill`` scores its evals: the same
    windows, batch per process and function, the student under bf16 autocast with ``--bf16`` as Trainer's
    accelerate wraps it (the teacher is not)."""
    import torch

    from swaa.convert.distill_options import check_global_batch
    from swaa.convert.distillation import heldout_metrics

    batch = check_global_batch(options["batch_size"], options["gradient_accumulation_steps"], _world_size())
    modes = student.training, teacher.training
    student.eval()
    teacher.eval()
    if options["bf16"]:
        device = next(student.parameters()).device
        student.forward = torch.autocast(device.type, dtype=torch.bfloat16)(student.forward)
    try:
        return heldout_metrics(student, teacher, held_out, batch)
    finally:
        if options["bf16"]:
            del student.forward  # the class's forward again
        student.train(modes[0])
        teacher.train(modes[1])


def _print_stage(name, m) -> None:
    print(
        f"held-out, {name}: perplexity {m['ppl']:.4g} (teacher {m['teacher_ppl']:.4g}, {m['ppl_ratio']:.3f}x), "
        f"KL {m['kl']:.3g}"
    )


def _prepare(args, out: Path, teacher, tokenizer, main: bool, held_out, options):
    """student-init/ and train_ids.pt, made by the main process (``main``), then loaded by every one.

    When TEACHER is converted here, the held-out windows ``held_out`` are also scored right after
    conversion and after attention transfer (``--transfer-steps``), into ``stages.json`` (written before
    ``student-init/``, so a resumed run keeps them)."""
    import copy

    import torch
    from transformers import AutoModelForCausalLM

    from swaa.convert.select import auto_count

    init, ids_path = out / "student-init", out / "train_ids.pt"
    if main and not (init / "config.json").is_file():
        if args.student is not None:
            from swaa.app.loading import load_model, resolve_source

            student = load_model(resolve_source(args.student), dtype=_dtype(args.dtype))
        else:
            student = copy.deepcopy(teacher)
            text_ids = None
            if auto_count(args.linear_layers) is not None or args.transfer_steps:
                text_ids = (
                    _training_ids(args, teacher, tokenizer) if not ids_path.exists() else torch.load(ids_path)
                )
                _save_atomic(lambda p: torch.save(text_ids, p), ids_path)
            selection = resolve_and_convert(
                student,
                args.linear_layers,
                args.kind,
                _options(args.option),
                args.seed,
                text_ids,
                args.progress,
            )
            if selection["method"] == "auto":
                print(f"auto layers ({selection['signal']}): {selection['layers']}")
            stages = {"untrained": _stage_metrics(student, teacher, held_out, options), "transferred": None}
            _print_stage("untrained", stages["untrained"])
            if args.transfer_steps:
                from swaa.convert import attention_transfer
                from swaa.convert.windows import split_windows

                windows = split_windows(text_ids, args.window)
                # a bounded sample: every converted layer's input and output is recorded for each window
                report = attention_transfer(
                    teacher,
                    student,
                    windows,
                    max_windows=args.transfer_windows,
                    steps=args.transfer_steps,
                    progress=args.progress,
                )
                print(f"attention transfer: {report['steps']} steps per layer on {report['windows']} windows")
                for i, e in report["layers"].items():
                    print(
                        f"attention transfer, layer {i}: relative error {e['before']:.3g} -> {e['after']:.3g}"
                    )
                stages["transferred"] = _stage_metrics(student, teacher, held_out, options)
                _print_stage("after attention transfer", stages["transferred"])
            _save_atomic(lambda p: p.write_text(json.dumps(stages, indent=1)), out / STAGES_FILE)
        _save_atomic(lambda p: student.save_pretrained(p), init)
        del student
    if main and not ids_path.exists():
        ids = _training_ids(args, teacher, tokenizer)
        _save_atomic(lambda p: torch.save(ids, p), ids_path)
    return init, ids_path, AutoModelForCausalLM


def _save_atomic(write, path: Path) -> None:
    # written next to its place and renamed, so a killed run never leaves half a file that looks whole
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    write(tmp)
    os.replace(tmp, path)


def _dtype(name):
    import torch

    return None if name is None else getattr(torch, name)


def _options(pairs):
    from swaa.app.flags import parse_options as parse

    return parse(pairs)


def _cmd_distill(args) -> int:
    started = time.time()
    options = _check_flags(args)
    out = Path(args.out).expanduser()
    record = _run_record(args)
    if (out / "model").exists():
        raise FileExistsError(f"OUT {str(out)!r} holds a finished run (model/); choose a new OUT")
    if out.exists() and not (out / "run.json").is_file() and any(out.iterdir()):
        raise FileExistsError(f"OUT {str(out)!r} exists and holds no swaa distill run; choose a new path")
    if (out / "run.json").is_file():
        _check_same_run(out, record)

    import torch
    from transformers import TrainingArguments

    import swaa
    from swaa.app.evaluate import tokenize_text
    from swaa.app.loading import load_config, load_model, load_tokenizer, read_text_file, resolve_source
    from swaa.convert import hybrid_record
    from swaa.convert.windows import split_windows

    source = resolve_source(args.teacher)
    try:
        tokenizer = load_tokenizer(source)
    except OSError:
        raise ValueError(
            "swaa distill needs the teacher's tokenizer (for its data and the held-out text), and TEACHER has none"
        ) from None
    eval_ids = tokenize_text(tokenizer, read_text_file(args.eval_text, "--eval-text"))
    split_windows(eval_ids, options["window"])  # enough held-out text for one window, before any weights load
    if any(_is_ids_file(d) for d in args.data):
        _check_id_files(args, _vocab_size(load_config(source), tokenizer))
    teacher = load_model(source, dtype=_dtype(args.dtype))

    # the process group, as Trainer will set it up: the first process prepares, the others wait for it
    world = TrainingArguments(
        output_dir=str(out / "checkpoints"), use_cpu=not torch.cuda.is_available(), report_to=[]
    )
    main = world.process_index == 0
    teacher.to(world.device)  # sampling and attention transfer run where training will
    if main:
        out.mkdir(parents=True, exist_ok=True)
        if not (out / "run.json").is_file():
            _save_atomic(lambda p: p.write_text(json.dumps({"flags": record}, indent=1)), out / "run.json")
    held_out = split_windows(eval_ids, options["window"], options["eval_windows"])  # as distill() scores
    with world.main_process_first(local=False, desc="swaa distill: student and data"):
        init, ids_path, auto_model = _prepare(args, out, teacher, tokenizer, main, held_out, options)
    student = auto_model.from_pretrained(init, dtype=teacher.dtype)
    train_ids = torch.load(ids_path)
    report = swaa.distill(
        teacher,
        student,
        train_ids,
        eval_ids,
        output_dir=out / "checkpoints",
        progress=args.progress,
        **options,
    )
    if report["resumed_from"]:
        print(f"resumed from {report['resumed_from']}")
    if main:
        _save_atomic(lambda p: (student.save_pretrained(p), tokenizer.save_pretrained(p)), out / "model")
        # the held-out score after each stage: before distillation from stages.json (none for a --student,
        # or for a run prepared before stages were recorded), distilled = the final eval
        stages_path = out / STAGES_FILE
        stages = json.loads(stages_path.read_text()) if stages_path.is_file() else {}
        report.update(
            stages={
                "untrained": stages.get("untrained"),
                "transferred": stages.get("transferred"),
                "distilled": report["eval"][-1] if report["eval"] else None,
            },
            train_tokens_available=train_ids.numel(),
            wall_s=round(time.time() - started, 1),
            processes=_world_size(),
            device=str(next(student.parameters()).device),
            linear_layers=hybrid_record(student.config)["linear_layers"],
        )
        (out / "report.json").write_text(json.dumps(report, indent=1))
        first, last = (report["eval"][0], report["eval"][-1]) if report["eval"] else (None, None)
        summary = (
            f"; held-out perplexity {first['ppl']:.4g} -> {last['ppl']:.4g} (teacher {last['teacher_ppl']:.4g}, "
            f"{last['ppl_ratio']:.3f}x), KL {first['kl']:.3g} -> {last['kl']:.3g}"
            if first
            else ""
        )
        stopped = (
            f" (stopped by --max-minutes {args.max_minutes:g} before {options['steps']})"
            if report["stopped_early"]
            else ""
        )
        print(
            f"distilled {report['steps']} steps{stopped} ({report['tokens']} tokens) -> {out / 'model'}{summary}"
        )
    return 0


def add_distill_parser(sub) -> None:
    """Register ``swaa distill`` on the CLI's subparsers (no torch imported)."""
    from swaa.app.defaults import DISTILL_KIND
    from swaa.app.flags import DTYPES as _DTYPES
    from swaa.app.flags import add_conversion_flags as _add_conversion

    p = sub.add_parser(
        "distill",
        help="train a hybrid end to end on the original's next-token distribution (KL), resumable",
        description="Distil TEACHER into a hybrid: the student (--student, or TEACHER converted with "
        "--linear-layers, auto:N included) learns TEACHER's next-token distribution on text that needs no "
        "download (--data), scored on held-out text (--eval-text). Rerun the same command to resume. "
        "Data-parallel: accelerate launch --num_processes N -m swaa distill ...",
    )
    p.add_argument(
        "teacher",
        metavar="TEACHER",
        help="the original model: a checkpoint folder, a .gguf file, or a hub id",
    )
    p.add_argument("out", metavar="OUT", help="folder of the run (new, or a run to resume)")
    p.add_argument(
        "--student", metavar="HYBRID", help="a hybrid saved by swaa convert (instead of --linear-layers)"
    )
    _add_conversion(p, kind=DISTILL_KIND)
    p.set_defaults(linear_layers=None)
    for action in p._actions:
        if action.dest == "linear_layers":
            action.help = (
                "layers of TEACHER to convert: as swaa convert, or 'auto:N' (the N layers whose conversion "
                "raises the KL to TEACHER least, measured after a short attention transfer)"
            )
    add_seed_flag(p)
    p.add_argument(
        "--transfer-steps",
        type=int,
        default=0,
        metavar="N",
        help="attention transfer steps per converted layer on the training text before distilling (default: 0)",
    )
    p.add_argument(
        "--transfer-windows",
        type=int,
        default=TRANSFER_WINDOWS,
        metavar="N",
        help="training windows attention transfer learns from (the first N; each converted layer's input and "
        f"output is kept for each) (default: {TRANSFER_WINDOWS})",
    )
    p.add_argument(
        "--data",
        action="append",
        metavar="SOURCE",
        help="training text, repeatable: 'teacher' (continuations TEACHER samples from varied prompts), "
        "'debian' (the licence texts in /usr/share/common-licenses), a .pt file of token ids (a 1-D integer "
        "tensor saved with torch.save, e.g. another run's train_ids.pt, used as it is: runs can share one "
        "sampling of TEACHER), or a UTF-8 file (default: teacher and debian)",
    )
    p.add_argument(
        "--teacher-samples",
        type=int,
        default=TEACHER_SAMPLES,
        metavar="N",
        help=f"samples per prompt (default: {TEACHER_SAMPLES})",
    )
    p.add_argument(
        "--teacher-tokens",
        type=int,
        default=TEACHER_TOKENS,
        metavar="N",
        help=f"longest sample continuation (default: {TEACHER_TOKENS})",
    )
    p.add_argument(
        "--eval-text",
        metavar="FILE",
        help="held-out UTF-8 text, never trained on (default: the Jargon File excerpt shipped with swaa)",
    )
    numbers = {
        "window": (int, "tokens per window"),
        "steps": (int, "optimizer steps"),
        "lr": (float, "AdamW learning rate"),
        "batch_size": (int, "windows per optimizer step, all processes together"),
        "gradient_accumulation_steps": (int, "forward passes per optimizer step"),
        "kl_weight": (float, "weight of KL(teacher || student)"),
        "ce_weight": (float, "weight of the next-token cross-entropy"),
        "temperature": (float, "softmax temperature of the KL"),
        "lora_rank": (int, "rank of LoRA adapters on every other Linear (0: none; needs peft)"),
        "lora_alpha": (float, "LoRA alpha (default: 2 x rank)"),
        "warmup_steps": (int, "linear warm-up steps"),
        "eval_every": (int, "held-out perplexity every N steps"),
        "eval_windows": (int, "held-out windows scored"),
        "save_every": (int, "checkpoint every N steps"),
        "save_total_limit": (int, "checkpoints kept"),
        "log_every": (int, "log the loss every N steps"),
        "max_minutes": (
            float,
            "time budget: stop after the first optimizer step that ends N minutes after training began, "
            "then score and write model/ and report.json as at the end (the learning-rate schedule stays "
            "sized for --steps, so a stopped run has not annealed; a rerun of a killed run may give another "
            "budget)",
        ),
    }
    for name, (kind, text) in numbers.items():
        default = DEFAULTS[name]
        shown = "" if default is None else f" (default: {default:g})"
        p.add_argument(
            _OPTION_FLAGS[name], dest=name, type=kind, default=default, metavar="N", help=text + shown
        )
    p.add_argument(
        "--train",
        choices=TRAIN_CHOICES,
        default=DEFAULTS["train"],
        help="parameters trained besides adapters (default: converted)",
    )
    p.add_argument(
        "--schedule",
        choices=SCHEDULES,
        default=DEFAULTS["schedule"],
        help=f"learning-rate schedule (default: {DEFAULTS['schedule']})",
    )
    p.add_argument("--bf16", action="store_true", help="bf16 autocast")
    p.add_argument("--dtype", choices=_DTYPES, help="load the models in this dtype (default: as stored)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    p.set_defaults(func=_cmd_distill)
