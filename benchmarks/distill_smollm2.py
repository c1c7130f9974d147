"""Issue 12's results on SmolLM2-135M-Instruct: several `swaa distill` runs side by side on one GPU.

    python benchmarks/distill_smollm2.py prep TEACHER RUNS --pydocs FILE      # training ids, once
    python benchmarks/distill_smollm2.py launch TEACHER RUNS --steps 600 ...   # every run, detached
    python benchmarks/distill_smollm2.py status RUNS                          # one line per run
    python benchmarks/distill_smollm2.py table TEACHER RUNS --out DIR         # README table + PNG

`prep` writes RUNS/train_ids.pt, shared by every run (`--data RUNS/train_ids.pt`), so the teacher is
sampled once: its own continuations of swaa's 28 varied prompts (`sample_teacher_text`, spread over
`--shards` processes, shard i taking prompts i, i+shards, ... with seed i), then the Debian licence texts
(`debian_prose`) and, with `--pydocs`, the Python 3.11 documentation's reStructuredText sources as Debian's
`python3.11-doc` installs them (`/usr/share/doc/python3.11/html/_sources`; PSF licence). Held-out text:
the Jargon File excerpt swaa ships (`swaa distill`'s default `--eval-text`), another source than all of
these, never trained on.

`prep` also measures auto:N's signal once per kind on the prose (`select_linear_layers`: each layer's KL
to the teacher when it alone is converted, after a short attention transfer; RUNS/select.json), and every
run converts the N cheapest layers of that ranking. `launch` starts one `python -m swaa distill` per (kind, N) in its own process session, so the runs outlive
the shell that started them (a lent GPU's command returns while they train); each logs to RUNS/<name>.log
and resumes from its checkpoints when launched again.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

KINDS = ("gla", "swa_gla")
COUNTS = (4, 8, 15, 22, 30)


def _run_name(kind: str, n: int) -> str:
    return f"{kind}-{n}"


def _ranking(scores) -> list[int]:
    """Layers from cheapest to dearest to convert, as select_linear_layers orders them."""
    return sorted(range(len(scores)), key=lambda i: (scores[i], i))


def _sample_shard(args) -> None:
    import torch

    from swaa.app.loading import load_model, load_tokenizer, resolve_source
    from swaa.convert.distill_data import DEFAULT_PROMPTS, sample_teacher_text

    source = resolve_source(args.teacher)
    tok = load_tokenizer(source)
    teacher = load_model(source).to("cuda" if torch.cuda.is_available() else "cpu")
    prompts = DEFAULT_PROMPTS[args.shard :: args.shards]
    ids = sample_teacher_text(
        teacher,
        prompts,
        tokenizer=tok,
        samples_per_prompt=args.samples,
        max_new_tokens=args.tokens,
        seed=args.shard,
        progress=False,
    )
    torch.save(ids, Path(args.runs) / f".teacher-{args.shard}.pt")


def _prep(args) -> None:
    import torch

    from swaa.app.evaluate import tokenize_text
    from swaa.app.loading import load_model, load_tokenizer, resolve_source
    from swaa.convert.distill_data import debian_prose
    from swaa.convert.select import select_linear_layers

    runs = Path(args.runs)
    runs.mkdir(parents=True, exist_ok=True)
    started = time.time()
    source = resolve_source(args.teacher)
    tok = load_tokenizer(source)
    parts = {"debian licences": tokenize_text(tok, debian_prose())}
    if args.pydocs:
        parts["python 3.11 docs"] = tokenize_text(tok, Path(args.pydocs).read_text(encoding="utf-8"))
    # auto:N's measurement, once per kind for every N (the ranking does not depend on N), on the prose
    teacher = load_model(source).to("cuda" if torch.cuda.is_available() else "cpu")
    prose = torch.cat(list(parts.values()))
    selections = {}
    for kind in args.kinds.split(","):
        record = select_linear_layers(
            teacher, 1, prose, kind, steps=args.select_steps, seed=0, progress=False
        )
        selections[kind] = {
            k: record[k] for k in ("signal", "scores", "errors", "steps", "windows", "window")
        }
        ranking = _ranking(selections[kind]["scores"])
        print(f"[{time.time() - started:5.0f}s] auto layers, {kind}: ranking {ranking}", flush=True)
    (runs / "select.json").write_text(json.dumps(selections, indent=1))
    del teacher
    # then the teacher's samples, in shards that run side by side (each a launch-bound generate), with no
    # selection competing for the GPU
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                __file__,
                "_shard",
                args.teacher,
                args.runs,
                "--shard",
                str(i),
                "--shards",
                str(args.shards),
                "--samples",
                str(args.samples),
                "--tokens",
                str(args.tokens),
            ]
        )
        for i in range(args.shards)
    ]
    if any(p.wait() for p in procs):
        raise SystemExit("a sampling shard failed")
    teacher = torch.cat([torch.load(runs / f".teacher-{i}.pt") for i in range(args.shards)])
    ids = torch.cat([teacher, *parts.values()])
    # int32 (every vocabulary fits): half the bytes a lent GPU's 64 MiB call carries; load_token_ids widens
    torch.save(ids.to(torch.int32), runs / "train_ids.pt")
    sizes = {"teacher samples": teacher.numel(), **{k: v.numel() for k, v in parts.items()}}
    info = {"tokens": sizes, "total": ids.numel(), "wall_s": round(time.time() - started, 1)}
    info.update(samples_per_prompt=args.samples, max_new_tokens=args.tokens, shards=args.shards)
    (runs / "train_ids.json").write_text(json.dumps(info, indent=1))
    print(json.dumps(info))


def _launch(args) -> None:
    runs = Path(args.runs)
    selections = json.loads((runs / "select.json").read_text())
    for kind in args.kinds.split(","):
        for n in (int(c) for c in args.counts.split(",")):
            name = _run_name(kind, n)
            if (runs / name / "report.json").exists():
                print(f"{name}: done")
                continue
            ranking = _ranking(selections[kind]["scores"])
            layers = "all" if n >= len(ranking) else ",".join(map(str, sorted(ranking[:n])))
            cmd = [
                sys.executable,
                __file__,
                "_run",
                *(["--first-config"] if args.first_config else []),
                "--",
                "distill",
                args.teacher,
                str(runs / name),
                "--linear-layers",
                layers,
                "--kind",
                kind,
                "--data",
                str(runs / "train_ids.pt"),
                "--transfer-steps",
                str(args.transfer_steps),
                "--transfer-windows",
                str(args.transfer_windows),
                "--window",
                str(args.window),
                "--batch-size",
                str(args.batch_size),
                "--gradient-accumulation-steps",
                str(args.accumulate),
                "--steps",
                str(args.steps),
                "--lr",
                str(args.lr),
                "--warmup-steps",
                str(args.warmup),
                "--lora-rank",
                str(args.lora_rank),
                "--eval-every",
                str(args.eval_every),
                "--eval-windows",
                str(args.eval_windows),
                "--save-every",
                str(args.eval_every),
                "--log-every",
                "10",
                "--bf16",
                "--no-progress",
            ]
            cmd += ["--schedule", args.schedule] + (
                ["--max-minutes", str(args.max_minutes)] if args.max_minutes else []
            )
            log = open(runs / f"{name}.log", "ab")
            subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
            print(f"{name}: started ({' '.join(cmd[3:])})")


def _run(args) -> None:
    """`swaa distill ARGS`, in this process (after --first-config's autotuning cut, when given)."""
    from swaa.app.cli import main as swaa_main

    raise SystemExit(swaa_main(args.argv))


def _status(args) -> None:
    for log in sorted(Path(args.runs).glob("*.log")):
        lines = [ln for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
        done = (log.with_suffix("") / "report.json").exists()
        print(f"{log.stem:12s} {'DONE' if done else '    '} {lines[-1][:160] if lines else ''}")


PROMPT = "What is the capital of France?"
STAGES = ("untrained", "transferred", "distilled")


def _table(args) -> None:
    """Per run: held-out perplexity ratio and the answer to PROMPT untrained, after attention transfer and
    after distillation; JSON, a markdown table and the PNG (ratio against N, one line per kind and stage)."""
    import copy

    import torch
    from transformers import AutoModelForCausalLM

    import swaa
    from swaa.app.evaluate import answer
    from swaa.app.loading import load_model, load_tokenizer, resolve_source

    device = "cuda" if torch.cuda.is_available() else "cpu"
    source = resolve_source(args.teacher)
    tok = load_tokenizer(source)
    teacher = load_model(source).to(device)
    rows = [{"run": "original", "answer": answer(teacher, tok, PROMPT, max_new_tokens=args.answer_tokens)}]
    for report_path in sorted(Path(args.runs).glob("*/report.json")):
        run = report_path.parent
        report = json.loads(report_path.read_text())
        flags = json.loads((run / "run.json").read_text())["flags"]
        stages = report.get("stages") or {}
        row = {"run": run.name, "kind": flags["kind"], "n": len(report["linear_layers"])}
        row.update(layers=report["linear_layers"], tokens=report["tokens"], steps=report["steps"])
        row.update(wall_s=report.get("wall_s"), device=report.get("device"), lr=flags.get("lr"))
        row.update(stopped_early=report.get("stopped_early"), lora_rank=flags.get("lora_rank"))
        for stage in STAGES:
            e = stages.get(stage) or {}
            row[f"{stage}_ratio"], row[f"{stage}_ppl"] = e.get("ppl_ratio"), e.get("ppl")
        models = {"transferred": run / "student-init", "distilled": run / "model"}
        for stage in STAGES:
            if stage == "untrained":
                torch.manual_seed(flags.get("seed", 0))
                net = swaa.convert_to_hybrid(
                    copy.deepcopy(teacher), report["linear_layers"], kind=flags["kind"]
                )
            elif stage == "transferred" and not flags.get("transfer_steps"):
                continue
            else:
                net = AutoModelForCausalLM.from_pretrained(models[stage]).to(device)
            row[f"{stage}_answer"] = answer(net, tok, PROMPT, max_new_tokens=args.answer_tokens)
            del net
        rows.append(row)
        print(json.dumps(row), flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = f"distill_smollm2_{args.device_name}"
    (out / f"{name}.json").write_text(json.dumps(rows, indent=1))
    (out / f"{name}.md").write_text(_markdown(rows))
    print(_markdown(rows))
    try:
        _plot(rows, out / f"{name}.png")
    except ImportError as err:  # the table stands without the picture
        print(f"no plot: {err}")


def _fmt(x, spec=".3f"):
    return "-" if x is None else format(x, spec)


def _markdown(rows) -> str:
    lines = [f"original answer: {rows[0]['answer']!r}", ""]
    lines.append(
        "| kind | N | held-out ppl ratio: untrained / transferred / distilled | answer after distillation "
        "| tokens | steps | wall s |"
    )
    lines.append("|---|---|---|---|---|---|---|")
    for r in sorted(rows[1:], key=lambda r: (r["kind"], r["n"])):
        ratios = " / ".join(_fmt(r[f"{s}_ratio"], ".3g") for s in STAGES)
        lines.append(
            f"| {r['kind']} | {r['n']} | {ratios} | {r.get('distilled_answer', '')!r} | "
            f"{r['tokens'] / 1e6:.1f}M | {r['steps']} | {_fmt(r['wall_s'], '.0f')} |"
        )
    return "\n".join(lines) + "\n"


def _plot(rows, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for kind in sorted({r["kind"] for r in rows[1:]}):
        runs = sorted((r for r in rows[1:] if r["kind"] == kind), key=lambda r: r["n"])
        for stage, style in zip(STAGES, (":", "--", "-")):
            pts = [(r["n"], r[f"{stage}_ratio"]) for r in runs if r[f"{stage}_ratio"] is not None]
            if pts:
                ax.plot(*zip(*pts), style, marker="o", label=f"{kind}, {stage}")
    ax.axhline(1.10, color="grey", lw=0.8)
    ax.axhline(1.5, color="grey", lw=0.8, ls="--")
    ax.set_yscale("log")
    ax.set_xlabel("converted layers N (of 30)")
    ax.set_ylabel("held-out perplexity / original's (Jargon File)")
    ax.set_title("SmolLM2-135M-Instruct hybrids")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    for name in ("prep", "_shard", "launch", "status", "table"):
        s = sub.add_parser(name)
        if name != "status":
            s.add_argument("teacher")
        s.add_argument("runs")
        if name in ("prep", "_shard"):
            s.add_argument("--shards", type=int, default=7)
            s.add_argument("--samples", type=int, default=32, help="samples per prompt")
            s.add_argument("--tokens", type=int, default=384, help="longest continuation")
        if name in ("prep", "launch"):
            s.add_argument(
                "--first-config",
                action="store_true",
                help="Triton's autotuning stops at the first working config (swaa.kernels.autotune): minutes "
                "less on a machine whose autotune cache is cold, at some kernel speed",
            )
        if name == "prep":
            s.add_argument("--pydocs", help="the Python docs' sources as one UTF-8 file")
            s.add_argument("--kinds", default=",".join(KINDS))
            s.add_argument("--select-steps", type=int, default=50, help="auto:N's transfer steps per layer")
        if name == "_shard":
            s.add_argument("--shard", type=int, required=True)
        if name == "launch":
            s.add_argument("--kinds", default=",".join(KINDS))
            s.add_argument("--counts", default=",".join(map(str, COUNTS)))
            s.add_argument("--transfer-steps", type=int, default=100)
            s.add_argument("--transfer-windows", type=int, default=16)
            s.add_argument("--window", type=int, default=512)
            s.add_argument("--batch-size", type=int, default=16)
            s.add_argument("--accumulate", type=int, default=2)
            s.add_argument("--steps", type=int, default=600)
            s.add_argument("--lr", type=float, default=5e-4)
            s.add_argument("--warmup", type=int, default=20)
            s.add_argument("--lora-rank", type=int, default=8)
            s.add_argument("--eval-every", type=int, default=100)
            s.add_argument("--eval-windows", type=int, default=16)
            s.add_argument("--max-minutes", type=float, default=None)
            s.add_argument("--schedule", default="cosine", choices=("constant", "linear", "cosine"))
        if name == "table":
            s.add_argument("--out", required=True)
            s.add_argument("--device-name", default="device")
            s.add_argument("--answer-tokens", type=int, default=24)
    r = sub.add_parser("_run")
    r.add_argument("--first-config", action="store_true")
    r.add_argument("argv", nargs=argparse.REMAINDER)
    args = p.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if getattr(args, "first_config", False):
        from swaa.kernels.autotune import stop_autotuning_at_first_working_config

        stop_autotuning_at_first_working_config()
    if args.cmd == "_run" and args.argv[:1] == ["--"]:
        args.argv = args.argv[1:]
    {
        "prep": _prep,
        "_shard": _sample_shard,
        "launch": _launch,
        "status": _status,
        "table": _table,
        "_run": _run,
    }[args.cmd](args)


if __name__ == "__main__":
    main()
