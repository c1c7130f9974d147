"""End-to-end distillation (swaa.distill) on tiny models: it lowers the held-out KL, a run interrupted and
resumed ends where an uninterrupted one does, 2 processes (accelerate launch, gloo) give the weights of 1
with the same global batch, LoRA adapters merge back into a plain hybrid, auto:N is reproducible, and bad
options are refused before anything trains. Needs accelerate (Trainer does); the LoRA cases need peft."""

import contextlib
import copy
import fcntl
import functools
import itertools
import json
import os
import socket
import subprocess
import sys
import tempfile

import pytest
import torch

import swaa
from swaa.convert import convert_to_hybrid, distillation
from swaa.convert.distill_data import debian_prose, sample_teacher_text
from swaa.convert.distill_options import check_distill_options
from swaa.convert.distillation import distill_loss, kl_divergence, last_checkpoint
from swaa.convert.select import (
    SELECTION_KEY,
    auto_count,
    record_selection,
    resolve_linear_layers,
    select_linear_layers,
)

pytest.importorskip("accelerate", reason="Trainer needs accelerate (pip install 'swaa[distill]')")

WINDOW = 32
# few, short steps at a large learning rate: the tiny runs move visibly in a second
RUN = dict(window=WINDOW, batch_size=4, lr=3e-3, log_every=1, save_every=3)


def pair(tiny_model, layers=(1, 3)):
    teacher = tiny_model("qwen3")
    return teacher, convert_to_hybrid(copy.deepcopy(teacher), list(layers))


def state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("chunk_rows", [1, 3, 64])
def test_the_row_chunked_kl_equals_the_plain_formula_with_its_gradient(temperature, chunk_rows):
    g = torch.Generator().manual_seed(1)
    s = (3 * torch.randn(2, 5, 11, generator=g)).requires_grad_()
    t = 3 * torch.randn(2, 5, 11, generator=g)
    got = kl_divergence(s, t, temperature, chunk_rows=chunk_rows)
    (grad,) = torch.autograd.grad(got, s)
    s64 = s.detach().double().requires_grad_()
    log_s, log_t = (torch.log_softmax(x.double() / temperature, -1) for x in (s64, t))
    want = (log_t.exp() * (log_t - log_s)).sum(-1).mean()
    (want_grad,) = torch.autograd.grad(want, s64)
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(grad.double(), want_grad, rtol=1e-5, atol=1e-7)
    assert grad.dtype == s.dtype


def _bytes_saved_for_backward(fn):
    saved = []

    def pack(x):
        saved.append(x.numel() * x.element_size())
        return x

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        fn()
    return sum(saved)


def test_the_distillation_kl_keeps_no_float32_copy_of_the_logits_for_backward():
    # bf16 logits of a [4, 64, 1000] batch: the plain formula keeps float32 log-softmaxes of the whole batch
    # (several times the logits' bytes); the loss keeps the two inputs only
    g = torch.Generator().manual_seed(2)
    s = torch.randn(4, 64, 1000, generator=g).bfloat16().requires_grad_()
    t = torch.randn(4, 64, 1000, generator=g).bfloat16()
    ids = torch.randint(0, 1000, (4, 64), generator=g)
    inputs = 2 * s.numel() * s.element_size()
    assert _bytes_saved_for_backward(lambda: distill_loss(s, t, ids)) == inputs
    plain = _bytes_saved_for_backward(lambda: kl_divergence(s, t.clone().requires_grad_()))
    assert plain > 3 * inputs  # the plain form (a teacher with gradient) shows what the hook counts


def test_distill_loss_is_kl_plus_cross_entropy():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(2, 5, 11, generator=g), torch.randn(2, 5, 11, generator=g)
    ids = torch.randint(0, 11, (2, 5), generator=g)
    assert distill_loss(t, t, ids).abs().item() < 1e-6  # KL of a distribution to itself
    kl = torch.nn.functional.kl_div(
        torch.log_softmax(s / 2, -1), torch.log_softmax(t / 2, -1), log_target=True, reduction="none"
    )
    torch.testing.assert_close(distill_loss(s, t, ids, temperature=2.0), 4 * kl.sum(-1).mean())
    ce = torch.nn.functional.cross_entropy(s[:, :-1].reshape(-1, 11), ids[:, 1:].reshape(-1))
    torch.testing.assert_close(distill_loss(s, t, ids, kl_weight=0.0, ce_weight=1.0), ce)


def test_distillation_on_teacher_samples_lowers_the_heldout_kl(tmp_path, tiny_model, tiny_ids):
    teacher, student = pair(tiny_model)
    prompts = [tiny_ids(3, seed=s).tolist() for s in range(8)]
    train = sample_teacher_text(teacher, prompts, samples_per_prompt=4, max_new_tokens=40, progress=False)
    held_out = tiny_ids(4 * WINDOW, seed=99)  # another source: uniform random tokens, never trained on
    teacher_before = state(teacher)
    report = swaa.distill(
        teacher, student, train, held_out, output_dir=tmp_path, steps=16, eval_every=8, progress=False, **RUN
    )
    first, last = report["eval"][0], report["eval"][-1]
    assert (first["step"], last["step"]) == (0, 16) and len(report["eval"]) == 3
    assert last["kl"] < 0.7 * first["kl"], report["eval"]
    assert report["losses"][-1][1] < report["losses"][0][1]
    assert report["tokens"] == 16 * 4 * WINDOW and report["steps"] == 16
    # the teacher is untouched; the student is back in eval mode with its flags as they were
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in teacher_before.items())
    assert not student.training and all(p.requires_grad for p in student.parameters())
    assert student.config.use_cache


@pytest.mark.parametrize("lora_rank", [0, 2], ids=["converted-layers", "lora"])
def test_a_resumed_run_ends_where_an_uninterrupted_one_does(tmp_path, tiny_model, tiny_ids, lora_rank):
    if lora_rank:
        pytest.importorskip("peft")
    from transformers import TrainerCallback

    train = tiny_ids(40 * WINDOW, seed=5)
    options = dict(steps=8, lora_rank=lora_rank, progress=False, **RUN)

    teacher, student = pair(tiny_model)
    whole = swaa.distill(teacher, student, train, output_dir=tmp_path / "whole", **options)
    expected = state(student)

    class Interrupt(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 5:
                raise KeyboardInterrupt  # as Ctrl-C: the checkpoint of step 3 is on disk, steps 4-5 are lost

    teacher, student = pair(tiny_model)
    with pytest.raises(KeyboardInterrupt):
        swaa.distill(teacher, student, train, output_dir=tmp_path / "cut", callbacks=[Interrupt()], **options)
    assert last_checkpoint(tmp_path / "cut").endswith("checkpoint-3")
    os.makedirs(tmp_path / "cut" / "checkpoint-4")  # a checkpoint cut off while written: ignored
    # a fresh process: new models, the same call
    teacher, student = pair(tiny_model)
    resumed = swaa.distill(teacher, student, train, output_dir=tmp_path / "cut", **options)
    assert resumed["resumed_from"].endswith("checkpoint-3") and resumed["steps"] == 8
    assert [s for s, _ in resumed["losses"]] == list(range(1, 9))
    torch.testing.assert_close(resumed["losses"], whole["losses"], rtol=1e-6, atol=0)
    after = state(student)
    assert after.keys() == expected.keys()
    for k in expected:
        torch.testing.assert_close(after[k], expected[k], rtol=1e-6, atol=1e-7, msg=k)
    # a finished run resumed trains no more
    again = swaa.distill(teacher, student, train, output_dir=tmp_path / "cut", **options)
    assert again["resumed_from"].endswith("checkpoint-8") and again["steps"] == 8


def test_a_time_budget_stops_after_the_step_that_crosses_it_and_a_later_call_finishes_the_run(
    tmp_path, tiny_model, tiny_ids, monkeypatch
):
    # a clock that moves one minute each time it is read: at training's start, then at each step's end
    monkeypatch.setattr(distillation, "_clock", functools.partial(next, itertools.count(0, 60)))
    train, held_out = tiny_ids(40 * WINDOW, seed=5), tiny_ids(2 * WINDOW, seed=99)
    options = dict(RUN, steps=8, save_every=100, eval_every=None, progress=False)

    teacher, student = pair(tiny_model)
    whole = swaa.distill(teacher, student, train, output_dir=tmp_path / "whole", **options)
    expected = state(student)
    assert whole["stopped_early"] is False and whole["max_minutes"] is None

    teacher, student = pair(tiny_model)
    cut = swaa.distill(
        teacher, student, train, held_out, output_dir=tmp_path / "cut", max_minutes=2.5, **options
    )
    # 1, 2, then 3 minutes at the ends of steps 1-3: step 3 is the first to end past 2.5
    assert cut["stopped_early"] is True and cut["steps"] == 3 and cut["max_minutes"] == 2.5
    assert cut["tokens"] == 3 * 4 * WINDOW and [s for s, _ in cut["losses"]] == [1, 2, 3]
    assert [e["step"] for e in cut["eval"]] == [0, 3]  # scored at the stop as after a last step
    assert last_checkpoint(tmp_path / "cut").endswith("checkpoint-3")
    torch.testing.assert_close(cut["losses"], whole["losses"][:3], rtol=1e-6, atol=0)

    # a later call continues from the stop on the schedule of all 8 steps: the uninterrupted run
    teacher, student = pair(tiny_model)
    rest = swaa.distill(teacher, student, train, output_dir=tmp_path / "cut", max_minutes=60.0, **options)
    assert rest["resumed_from"].endswith("checkpoint-3") and rest["steps"] == 8
    assert rest["stopped_early"] is False
    torch.testing.assert_close(rest["losses"], whole["losses"], rtol=1e-6, atol=0)
    after = state(student)
    for k in expected:
        torch.testing.assert_close(after[k], expected[k], rtol=1e-6, atol=1e-7, msg=k)


def test_lora_adapters_train_the_rest_and_merge_into_a_plain_hybrid(tmp_path, tiny_model, tiny_ids):
    pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    teacher, student = pair(tiny_model)
    before = state(student)
    report = swaa.distill(
        teacher,
        student,
        tiny_ids(16 * WINDOW, seed=5),
        output_dir=tmp_path,
        steps=3,
        lora_rank=2,
        progress=False,
        **RUN,
    )
    after = state(student)
    assert after.keys() == before.keys()  # adapters merged: no lora_ keys, no wrappers
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert "model.layers.0.mlp.up_proj.weight" in changed  # a softmax layer's MLP, through its adapter
    assert "model.layers.1.self_attn.gk_proj.1.bias" in changed  # a converted layer, trained whole
    assert not any(k.startswith(("model.embed_tokens", "lm_head")) for k in changed)
    assert report["trained_parameters"] < sum(p.numel() for p in student.parameters())
    student.save_pretrained(tmp_path / "saved")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "saved")
    ids = tiny_ids(1, 12)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, student(ids).logits)


_SCRIPT = """
import os, sys, torch
import swaa
from transformers import AutoModelForCausalLM
teacher = AutoModelForCausalLM.from_pretrained(sys.argv[1])
student = AutoModelForCausalLM.from_pretrained(sys.argv[2])
report = swaa.distill(teacher, student, torch.load(sys.argv[3]), output_dir=sys.argv[4], progress=False,
                      **{k: v for k, v in __import__("json").loads(sys.argv[5]).items()})
if int(os.environ.get("RANK", "0")) == 0:
    torch.save(student.state_dict(), sys.argv[6])
    __import__("json").dump(report, open(sys.argv[6] + ".json", "w"))
if torch.distributed.is_initialized():
    torch.distributed.destroy_process_group()  # gloo's threads, stopped before the interpreter exits
"""


@contextlib.contextmanager
def _one_launch_at_a_time():
    # `make test` runs the two transformers suites side by side: their 2-process launches (4 processes on 2
    # cores) take turns, so neither waits out its timeout under the other's load
    with open(os.path.join(tempfile.gettempdir(), "swaa-tests-accelerate-launch.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _clean_environ() -> dict:
    # without what earlier Trainer runs in this process left behind: transformers 4.57's TrainingArguments
    # writes ACCELERATE_MIXED_PRECISION (bf16 after a bf16 test) and more into os.environ, and launched
    # processes read them: in a full make test the 2-process run trained in bf16 and came out 9.7e-3 off
    return {k: v for k, v in os.environ.items() if not k.startswith("ACCELERATE_")}


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _write_run_files(tmp_path, tiny_model, tiny_ids) -> None:
    """The teacher, the student, the ids and _SCRIPT in tmp_path, for _run_script."""
    teacher, student = pair(tiny_model)
    teacher.save_pretrained(tmp_path / "teacher")
    student.save_pretrained(tmp_path / "student")
    torch.save(tiny_ids(24 * WINDOW, seed=5), tmp_path / "ids.pt")
    (tmp_path / "run.py").write_text(_SCRIPT)


def _run_script(tmp_path, options: dict, out: str, result: str, processes: int) -> None:
    """_SCRIPT on the files _write_run_files wrote, in fresh interpreters: 2 processes through accelerate
    launch, or 1 plain one; the student's weights land in tmp_path / result (its report beside them)."""
    env = {**_clean_environ(), "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    args = [str(tmp_path / n) for n in ("run.py", "teacher", "student", "ids.pt", out)]
    args += [json.dumps(options), str(tmp_path / result)]
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    launch += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    with _one_launch_at_a_time() if processes > 1 else contextlib.nullcontext():
        # the port is chosen inside the lock: free when the launch takes it
        command = [*launch, "--main_process_port", str(_free_port())] if processes > 1 else [sys.executable]
        done = subprocess.run([*command, *args], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


def test_two_processes_through_accelerate_launch_equal_one(tmp_path, tiny_model, tiny_ids):
    """Tolerance: the gradient all-reduce adds the two halves in another order than one process's batch
    mean, and Adam divides by sqrt(v), so after 6 steps at lr 3e-3 the weights differ by ~1e-5 (each step
    moves them by up to 3e-3)."""
    from transformers import AutoModelForCausalLM

    _write_run_files(tmp_path, tiny_model, tiny_ids)
    options = dict(RUN, steps=6, save_every=100)
    _run_script(tmp_path, options, "out2", "two.pt", processes=2)
    # one process, the same script, in a fresh interpreter as the two were
    _run_script(tmp_path, options, "out1", "one.pt", processes=1)

    initial = state(AutoModelForCausalLM.from_pretrained(tmp_path / "student"))
    student = AutoModelForCausalLM.from_pretrained(tmp_path / "student")
    student.load_state_dict(torch.load(tmp_path / "one.pt"))
    one, two = state(student), torch.load(tmp_path / "two.pt")
    moved = max((one[k] - initial[k]).abs().max().item() for k in one)
    assert moved > 1e-3
    for k in one:
        worst = (two[k] - one[k]).abs().max().item()
        assert worst <= 1e-4, f"{k}: {worst:.2e} off one process's"


def test_two_processes_stop_at_the_same_step_of_a_time_budget(tmp_path, tiny_model, tiny_ids):
    # a budget every step overruns: the first process's clock decides, so both stop after step 1 (a process
    # that went on alone would wait for the other at its next all-reduce, and the launch would time out)
    _write_run_files(tmp_path, tiny_model, tiny_ids)
    _run_script(tmp_path, dict(RUN, steps=6, save_every=100, max_minutes=1e-9), "out", "two.pt", processes=2)
    report = json.loads((tmp_path / "two.pt.json").read_text())
    assert report["steps"] == 1 and report["stopped_early"] is True
    assert last_checkpoint(tmp_path / "out").endswith("checkpoint-1")


def test_the_global_batch_must_split_evenly_over_processes(tmp_path, tiny_model, tiny_ids, monkeypatch):
    teacher, student = pair(tiny_model)
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(
        ValueError, match="batch_size=4 .* multiple of processes x gradient_accumulation_steps = 3 x 1"
    ):
        swaa.distill(teacher, student, tiny_ids(8 * WINDOW), output_dir=tmp_path / "out", **RUN)


@pytest.mark.parametrize(
    "options, error, match",
    [
        (dict(steps=0), ValueError, "steps must be a positive int, got 0"),
        (dict(lr=-1.0), ValueError, "lr must be a positive number"),
        (dict(batch_size=6, gradient_accumulation_steps=4), ValueError, "multiple of processes"),
        (dict(kl_weight=0.0, ce_weight=0.0), ValueError, "both 0"),
        (dict(ce_weight=-1.0), ValueError, "ce_weight must be a non-negative number"),
        (dict(temperature=0), ValueError, "temperature must be a positive number"),
        (dict(train="some"), ValueError, "train must be one of"),
        (dict(lora_rank=2, train="all"), ValueError, "train='all'"),
        (dict(lora_alpha=8.0), ValueError, "lora_alpha needs lora_rank"),
        (dict(warmup_steps=200), ValueError, "warmup_steps must be < steps=200"),
        (dict(eval_every=0), ValueError, "eval_every must be a positive int or None"),
        (dict(bf16="yes"), TypeError, "bf16 must be a bool"),
        (dict(max_minutes=0), ValueError, "max_minutes must be a positive number or None, got 0"),
        (dict(max_minutes="5"), TypeError, "max_minutes must be a positive number or None, got str"),
        (dict(steps=2.5), TypeError, "steps must be a positive int, got float"),
        (dict(step=10), TypeError, "unknown distillation options \\['step'\\]"),
        (dict(resume="yes"), TypeError, "resume must be a bool"),
        (dict(window=1000), ValueError, "need at least window=1000 tokens"),
    ],
)
def test_bad_options_are_refused_before_anything_trains(
    tmp_path, tiny_model, tiny_ids, options, error, match
):
    teacher, student = pair(tiny_model)
    before = state(student)
    with pytest.raises(error, match=match):
        swaa.distill(
            teacher, student, tiny_ids(8 * WINDOW), output_dir=tmp_path / "out", **{**RUN, **options}
        )
    assert not (tmp_path / "out").exists()
    assert all(torch.equal(v, student.state_dict()[k]) for k, v in before.items())
    assert all(p.requires_grad for p in student.parameters())


def test_the_models_are_checked_before_anything_trains(tmp_path, tiny_model, tiny_ids):
    teacher, student = pair(tiny_model)
    with pytest.raises(ValueError, match="student must be a hybrid"):
        swaa.distill(teacher, copy.deepcopy(teacher), tiny_ids(8 * WINDOW), output_dir=tmp_path, **RUN)
    with pytest.raises(ValueError, match="differ in num_hidden_layers"):
        swaa.distill(
            tiny_model("qwen3", num_hidden_layers=2),
            student,
            tiny_ids(8 * WINDOW),
            output_dir=tmp_path,
            **RUN,
        )
    swaa.distill(teacher, student, tiny_ids(8 * WINDOW), output_dir=tmp_path, steps=1, progress=False, **RUN)
    with pytest.raises(ValueError, match="holds checkpoints of an earlier run"):
        swaa.distill(teacher, student, tiny_ids(8 * WINDOW), output_dir=tmp_path, resume=False, **RUN)


def test_default_options_pass_their_own_checks():
    assert check_distill_options()["steps"] == 200


def test_auto_layers_are_reproducible_and_recorded(tmp_path, tiny_model, tiny_ids):
    from transformers import AutoModelForCausalLM

    teacher = tiny_model("qwen3")
    before = state(teacher)
    ids = tiny_ids(4 * WINDOW, seed=4)
    rng = torch.random.get_rng_state()
    options = dict(steps=5, window=WINDOW, progress=False)
    first = select_linear_layers(teacher, 2, ids, seed=0, **options)
    assert torch.equal(torch.random.get_rng_state(), rng)  # the caller's random state is left alone
    assert first == select_linear_layers(teacher, 2, ids, seed=0, **options)
    assert len(first["layers"]) == 2 and len(first["scores"]) == 4 and first["signal"] == "kl"
    ranked = sorted(range(4), key=lambda i: (first["scores"][i], i))
    assert first["layers"] == sorted(ranked[:2])
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in before.items())
    assert all(type(layer.self_attn).__name__ == "Qwen3Attention" for layer in teacher.model.layers)
    by_error = select_linear_layers(teacher, 1, ids, seed=0, signal="error", **options)
    assert by_error["layers"] == [min(range(4), key=lambda i: by_error["errors"][i])]
    assert by_error["errors"] == first["errors"]  # one transfer, two readings of it

    layers, selection = resolve_linear_layers(teacher, "auto:2", ids, seed=0, **options)
    assert (layers, selection) == (first["layers"], first)
    student = convert_to_hybrid(copy.deepcopy(teacher), layers)
    record_selection(student.config, selection)
    student.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())[SELECTION_KEY] == json.loads(json.dumps(first))
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert getattr(loaded.config, SELECTION_KEY)["layers"] == layers
    assert resolve_linear_layers(teacher, "last:2", seed=3) == (
        [2, 3],
        {"method": "given", "spec": "last:2", "layers": [2, 3], "seed": 3},
    )


@pytest.mark.parametrize(
    "call, error, match",
    [
        (dict(n=5), IndexError, "auto:5 asks for 5 layers of a model with 4"),
        (dict(signal="loss"), ValueError, "signal must be one of"),
        (dict(steps=0), ValueError, "steps must be a positive int"),
        (dict(seed=-1), ValueError, "seed must be a non-negative int"),
        (dict(kind="mamba"), ValueError, "kind must be one of"),
        (dict(input_ids=None), ValueError, "needs text"),
    ],
)
def test_auto_refuses_bad_arguments_before_measuring(tiny_model, tiny_ids, call, error, match):
    teacher = tiny_model("qwen3")
    args = dict(n=2, input_ids=tiny_ids(4 * WINDOW), window=WINDOW, progress=False) | call
    n, ids = args.pop("n"), args.pop("input_ids")
    with pytest.raises(error, match=match):
        select_linear_layers(teacher, n, ids, **args)


def test_auto_count_reads_only_auto():
    assert auto_count("auto:3") == 3 and auto_count(" AUTO : 0 ") == 0
    assert auto_count("last:3") is None and auto_count([1, 2]) is None
    with pytest.raises(ValueError, match="'auto:N' needs an integer N >= 0"):
        auto_count("auto:x")


def test_teacher_samples_are_reproducible_by_seed(tiny_model, tiny_ids):
    teacher = tiny_model("qwen3")
    prompts = [tiny_ids(2, seed=s).tolist() for s in range(3)]
    a = sample_teacher_text(teacher, prompts, samples_per_prompt=2, max_new_tokens=8, seed=1, progress=False)
    b = sample_teacher_text(teacher, prompts, samples_per_prompt=2, max_new_tokens=8, seed=1, progress=False)
    c = sample_teacher_text(teacher, prompts, samples_per_prompt=2, max_new_tokens=8, seed=2, progress=False)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.dtype == torch.long and a.dim() == 1 and a.numel() >= 3 * 2 * 3
    # a later prompt's samples do not depend on the ones before it
    tail = sample_teacher_text(
        teacher, prompts[:1], samples_per_prompt=2, max_new_tokens=8, seed=1, progress=False
    )
    assert torch.equal(a[: tail.numel()], tail)
    with pytest.raises(ValueError, match="need the teacher's tokenizer"):
        sample_teacher_text(teacher, ["text"], progress=False)


def test_debian_prose_reads_each_licence_once(tmp_path):
    (tmp_path / "A").write_text("first licence\n")
    (tmp_path / "B").symlink_to(tmp_path / "A")
    (tmp_path / "C").write_text("second licence\n")
    assert debian_prose([str(tmp_path)]) == "first licence\n\nsecond licence"
    with pytest.raises(FileNotFoundError, match="no text found"):
        debian_prose([str(tmp_path / "nothing")])
    if os.path.isdir("/usr/share/common-licenses"):
        assert "GNU GENERAL PUBLIC LICENSE" in debian_prose()
