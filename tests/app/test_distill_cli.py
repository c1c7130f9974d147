"""``swaa distill`` and ``swaa convert --linear-layers auto:N`` on a tiny Llama with a character-level
tokenizer built here (nothing downloaded): a killed run resumes from its last checkpoint and finishes, a
rerun with other flags is refused, bad flags are refused before any model is even located, and auto:N
writes its measurement into the saved config, the same for the same seed."""

import functools
import itertools
import json
import signal
import subprocess
import sys
import time

import pytest

from swaa.app.cli import main

pytest.importorskip("accelerate", reason="Trainer needs accelerate (pip install 'swaa[distill]')")

PROSE = (
    "The keeper of the lighthouse climbed the stairs every evening and lit the lamp. Ships passed in the "
    "night, and none of them knew his name, but all of them knew the light. "
)


def char_tokenizer():
    """Printable ASCII, one token a character, ids 0-3 for pad, eos, bos and unknown: 99 tokens."""
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "</s>": 1, "<s>": 2, "<unk>": 3}
    vocab.update({chr(c): 4 + i for i, c in enumerate(range(32, 127))})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Replace("\n", " ")
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", bos_token="<s>", unk_token="<unk>"
    )


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory, tiny_model):
    where = tmp_path_factory.mktemp("teacher")
    tiny_model("llama", vocab_size=99).save_pretrained(where)
    char_tokenizer().save_pretrained(where)
    (where / "prose.txt").write_text(PROSE * 30)
    return where


def distill_args(teacher_dir, out, *extra):
    # plain GLA: a conversion far from the teacher, so the runs have something to learn (the default kind,
    # sliding-window GLA, is exact on windows shorter than its own)
    return [
        "distill", str(teacher_dir), str(out), "--linear-layers", "1,3", "--kind", "gla", "--data", "teacher",
        "--data", str(teacher_dir / "prose.txt"), "--teacher-samples", "1", "--teacher-tokens", "24",
        "--window", "32", "--batch-size", "2", "--eval-windows", "2", "--lr", "3e-3", "--no-progress", *extra,
    ]  # fmt: skip


def test_a_killed_distill_run_resumes_from_its_last_checkpoint(tmp_path, teacher_dir, capsys):
    out = tmp_path / "run"
    args = distill_args(teacher_dir, out, "--steps", "60", "--save-every", "3", "--eval-every", "30")
    proc = subprocess.Popen(
        [sys.executable, "-m", "swaa", *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        deadline = time.time() + 120
        while not list(out.glob("checkpoints/checkpoint-*/trainer_state.json")):
            assert proc.poll() is None, "the run ended before its first checkpoint"
            assert time.time() < deadline, "no checkpoint after 120 s"
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert not (out / "model").exists()
    assert (out / "student-init" / "config.json").is_file() and (out / "train_ids.pt").is_file()

    # the same command with another flag is another run
    assert main([*args[:-6], "--steps", "60", "--save-every", "3", "--eval-every", "10"]) == 1
    assert "holds a run started with other flags (eval_every: 30 then, 10 now)" in capsys.readouterr().err

    # a time budget is not part of the run: the killed run resumes with one
    assert main([*args, "--max-minutes", "600"]) == 0
    printed = capsys.readouterr().out
    assert "resumed from" in printed and "distilled 60 steps" in printed
    report = json.loads((out / "report.json").read_text())
    assert report["steps"] == 60 and report["resumed_from"] and report["linear_layers"] == [1, 3]
    assert report["stopped_early"] is False and report["tokens"] == 60 * 2 * 32
    assert [e["step"] for e in report["eval"]][-1] == 60
    assert report["eval"][-1]["kl"] < report["eval"][0]["kl"]

    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(out / "model")
    assert model.config.swaa_hybrid["linear_layers"] == [1, 3]
    assert model.config.swaa_selection == {"method": "given", "spec": "1,3", "layers": [1, 3], "seed": 0}
    assert AutoTokenizer.from_pretrained(out / "model")("ab")["input_ids"] == [69, 70]
    # a finished run is not run again
    assert main(args) == 1
    assert "holds a finished run" in capsys.readouterr().err


def test_a_run_stopped_by_its_time_budget_is_finished(tmp_path, teacher_dir, capsys, monkeypatch):
    from swaa.convert import distillation

    # a clock that moves one minute each time it is read: at training's start, then at each step's end
    monkeypatch.setattr(distillation, "_clock", functools.partial(next, itertools.count(0, 60)))
    out = tmp_path / "run"
    args = distill_args(teacher_dir, out, "--steps", "60", "--save-every", "100", "--eval-every", "100")
    assert main([*args, "--max-minutes", "2.5"]) == 0, capsys.readouterr().err
    assert (
        "distilled 3 steps (stopped by --max-minutes 2.5 before 60) (192 tokens)" in capsys.readouterr().out
    )
    report = json.loads((out / "report.json").read_text())
    assert report["stopped_early"] is True and report["steps"] == 3 and report["tokens"] == 3 * 2 * 32
    assert [e["step"] for e in report["eval"]] == [0, 3]  # the final held-out score, at the stop
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(out / "model").config.swaa_hybrid["linear_layers"] == [1, 3]
    # stopped is finished: a rerun, even with a larger budget, is refused
    assert main([*args, "--max-minutes", "600"]) == 1
    assert "holds a finished run" in capsys.readouterr().err


def test_token_ids_saved_by_one_run_are_used_as_they_are_by_another(tmp_path, teacher_dir, capsys):
    import torch

    ids = torch.randint(4, 99, (300,), generator=torch.Generator().manual_seed(0))
    torch.save(ids.to(torch.int32), tmp_path / "ids.pt")
    quick = ["--steps", "1", "--save-every", "100", "--eval-every", "100", "--eval-windows", "1"]
    first = [
        "distill", str(teacher_dir), str(tmp_path / "a"), "--linear-layers", "1,3", "--data",
        str(tmp_path / "ids.pt"), "--data", str(teacher_dir / "prose.txt"), "--window", "32",
        "--batch-size", "2", "--no-progress", *quick,
    ]  # fmt: skip
    assert main(first) == 0, capsys.readouterr().err
    assert f"training text: {tmp_path / 'ids.pt'}: 300 tokens" in capsys.readouterr().out
    # no --kind: the distilled layers are sliding-window GLA
    assert (
        json.loads((tmp_path / "a" / "model" / "config.json").read_text())["swaa_hybrid"]["kind"] == "swa_gla"
    )
    saved = torch.load(tmp_path / "a" / "train_ids.pt")
    assert saved.dtype == torch.long and torch.equal(saved[:300], ids)  # as saved, then the tokenized prose
    assert saved.numel() == 300 + len(PROSE * 30)  # one token a character

    # the second run trains on the first's training tokens, not a new sampling of the teacher
    second = [*first[:2], str(tmp_path / "b"), "--linear-layers", "0"]
    second += ["--data", str(tmp_path / "a" / "train_ids.pt"), *first[9:]]
    assert main(second) == 0, capsys.readouterr().err
    assert torch.equal(torch.load(tmp_path / "b" / "train_ids.pt"), saved)


@pytest.mark.parametrize(
    "saved, message",
    [
        (
            lambda t: t.randint(4, 99, (64,)).float(),
            "needs a non-empty 1-D integer tensor of token ids, got torch.float32 of shape [64]",
        ),
        (lambda t: t.randint(4, 99, (2, 32)), "got torch.int64 of shape [2, 32]"),
        (lambda t: t.tensor([5, 99, 7]), "token id 99 is outside the vocabulary of 99 (ids 0 to 98)"),
        (lambda t: t.tensor([5, -1]), "token id -1 is outside the vocabulary of 99"),
        (lambda t: {"ids": t.arange(8)}, "holds a dict, not a tensor of token ids"),
        (None, "not a tensor saved with torch.save"),
    ],
    ids=["float", "2-D", "too-large", "negative", "dict", "not-torch"],
)
def test_bad_token_id_files_are_refused_before_any_weights_load(
    tmp_path, teacher_dir, capsys, monkeypatch, saved, message
):
    import torch

    import swaa.app.loading

    def no_weights(*args, **kwargs):
        raise AssertionError("weights loaded before --data was checked")

    monkeypatch.setattr(swaa.app.loading, "load_model", no_weights)
    path = tmp_path / "ids.pt"
    if saved is None:
        path.write_text("token ids, but as text")
    else:
        torch.save(saved(torch), path)
    out = tmp_path / "out"
    assert main(distill_args(teacher_dir, out)[:5] + ["--data", str(path), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"swaa distill: error: --data {str(path)!r}: ") and message in err, err
    assert not out.exists()


def test_the_report_scores_each_stage_and_a_resumed_run_keeps_them(
    tmp_path, teacher_dir, capsys, monkeypatch
):
    import torch

    from swaa.convert import distillation

    reads = itertools.count()

    def clock():
        # read at training's start, then at each step's end: Ctrl-C as step 2 ends (step 1 is saved)
        if next(reads) == 2:
            raise KeyboardInterrupt
        return 0.0

    monkeypatch.setattr(distillation, "_clock", clock)
    out = tmp_path / "run"
    args = distill_args(
        teacher_dir,
        out,
        "--steps",
        "4",
        "--save-every",
        "1",
        "--transfer-steps",
        "3",
        "--transfer-windows",
        "2",
    )
    assert main([*args, "--max-minutes", "100"]) == 130
    printed = capsys.readouterr().out
    # attention transfer keeps every window's recordings: it learns from the first --transfer-windows only
    assert "attention transfer: 3 steps per layer on 2 windows" in printed
    assert "held-out, untrained: perplexity" in printed and "held-out, after attention transfer" in printed
    stages = json.loads((out / "stages.json").read_text())
    assert set(stages) == {"untrained", "transferred"}
    assert set(stages["untrained"]) == {"ppl", "teacher_ppl", "ppl_ratio", "kl"}
    # two measurements: attention transfer changed the converted layers (3 steps need not lower the KL)
    assert stages["transferred"]["kl"] != stages["untrained"]["kl"]
    assert stages["transferred"]["teacher_ppl"] == stages["untrained"]["teacher_ppl"]

    # resumed: the stages are read, not measured again (the conversion is not redone)
    assert main(args) == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    assert "resumed from" in printed and "held-out, untrained" not in printed
    report = json.loads((out / "report.json").read_text())
    assert report["stages"]["untrained"] == stages["untrained"]
    assert report["stages"]["transferred"] == stages["transferred"]
    assert report["stages"]["distilled"] == report["eval"][-1] and report["eval"][-1]["step"] == 4
    # the same windows and metric as distillation's evals: its step-0 score is the transferred one
    step0 = report["eval"][0]
    assert step0["step"] == 0
    for k in ("ppl", "teacher_ppl", "ppl_ratio", "kl"):
        assert step0[k] == pytest.approx(stages["transferred"][k], rel=1e-5), k
    assert report["train_tokens_available"] == torch.load(out / "train_ids.pt").numel()
    assert report["stopped_early"] is False


def test_with_bf16_the_untrained_score_is_distillations_step_0_score(tmp_path, teacher_dir, capsys):
    # Trainer runs the student under bf16 autocast (accelerate wraps its forward); the stage score does too.
    # --kind linear: the naive GLA kernel fails under CPU bf16 autocast (gla.py's in-place baddbmm_ mixes
    # dtypes), in swaa.distill(bf16=True) as well
    out = tmp_path / "run"
    args = distill_args(teacher_dir, out, "--steps", "1", "--save-every", "100", "--bf16", "--kind", "linear")
    assert main(args) == 0, capsys.readouterr().err
    report = json.loads((out / "report.json").read_text())
    assert report["stages"]["transferred"] is None  # no --transfer-steps
    untrained, step0 = report["stages"]["untrained"], report["eval"][0]
    assert step0["step"] == 0
    for k in ("ppl", "teacher_ppl", "ppl_ratio", "kl"):
        assert step0[k] == pytest.approx(untrained[k], rel=1e-5), k


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--linear-layers", "1", "--lr", "0"], "--lr must be a positive number, got 0.0"),
        (
            ["--linear-layers", "1", "--batch-size", "3", "--gradient-accumulation-steps", "2"],
            "multiple of processes",
        ),
        (["--linear-layers", "1", "--lora-alpha", "4"], "--lora-alpha needs --lora-rank >= 1"),
        (["--linear-layers", "1", "--steps", "0"], "--steps must be a positive int, got 0"),
        (
            ["--linear-layers", "1", "--max-minutes", "0"],
            "--max-minutes must be a positive number or None, got 0.0",
        ),
        (["--linear-layers", "1", "--max-minutes", "-5"], "--max-minutes must be a positive number or None"),
        ([], "give either --student (a saved hybrid) or --linear-layers"),
        (["--linear-layers", "1", "--student", "x"], "give either --student"),
        (["--linear-layers", "auto:x"], "'auto:N' needs an integer N >= 0"),
        (["--linear-layers", "1", "--seed", "-2"], "--seed must be a non-negative int"),
        (
            ["--linear-layers", "1", "--data", "no-such.txt"],
            "--data: 'no-such.txt' is neither teacher nor debian nor a file",
        ),
        (["--linear-layers", "1", "--teacher-samples", "0"], "--teacher-samples must be >= 1"),
        (["--linear-layers", "1", "--transfer-steps", "-1"], "--transfer-steps must be >= 0"),
        (["--linear-layers", "1", "--transfer-windows", "0"], "--transfer-windows must be >= 1"),
        (["--linear-layers", "1", "--eval-text", "no-such.txt"], "--eval-text: no such file"),
    ],
)
def test_bad_distill_flags_are_refused_before_any_model_is_located(tmp_path, capsys, flags, message):
    out = tmp_path / "out"
    assert main(["distill", str(tmp_path / "no-such-model"), str(out), *flags]) == 1
    err = capsys.readouterr().err
    assert err.startswith("swaa distill: error: ") and message in err, err
    assert not out.exists()


def test_held_out_text_may_not_be_trained_on(tmp_path, capsys):
    text = tmp_path / "t.txt"
    text.write_text(PROSE)
    flags = ["--linear-layers", "1", "--data", str(text), "--eval-text", str(text)]
    assert main(["distill", str(tmp_path / "m"), str(tmp_path / "out"), *flags]) == 1
    assert "is also a --data file" in capsys.readouterr().err


def test_convert_auto_layers_are_measured_recorded_and_reproducible(tmp_path, teacher_dir, capsys):
    def convert(out, seed):
        args = ["convert", str(teacher_dir), str(out), "--linear-layers", "auto:2", "--seed", str(seed)]
        args += [
            "--transfer-text",
            str(teacher_dir / "prose.txt"),
            "--transfer-steps",
            "3",
            "--transfer-windows",
            "2",
        ]
        assert main(args) == 0, capsys.readouterr().err
        return json.loads((out / "config.json").read_text())

    first, again = convert(tmp_path / "a", 3), convert(tmp_path / "b", 3)
    printed = capsys.readouterr().out
    assert "auto layers by kl" in printed
    selection = first["swaa_selection"]
    assert selection == again["swaa_selection"]
    assert selection["method"] == "auto" and selection["seed"] == 3 and len(selection["scores"]) == 4
    assert first["swaa_hybrid"]["linear_layers"] == selection["layers"] and len(selection["layers"]) == 2
    assert main(["convert", str(teacher_dir), str(tmp_path / "c"), "--linear-layers", "auto:9"]) == 1
    assert "auto:9 asks for 9 layers of a model with 4 layers" in capsys.readouterr().err
    assert not (tmp_path / "c").exists()
