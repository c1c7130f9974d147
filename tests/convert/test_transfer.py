"""attention_transfer on tiny random models: each converted layer moves toward the softmax attention it
replaced, nothing else changes, and bad calls are refused before anything changes (CPU)."""

import copy

import pytest
import torch

import swaa
from swaa.convert import attention_transfer, convert_to_hybrid

# three layers: a first, a middle and a last one to convert
LAYERS = 3


@pytest.fixture
def pair(tiny_model):
    """A tiny teacher of `family` and its hybrid student with `layers` converted to `kind`."""

    def build(family="qwen3", layers=(1,), kind="gla", **options):
        teacher = tiny_model(family, num_hidden_layers=LAYERS)
        student = convert_to_hybrid(copy.deepcopy(teacher), list(layers), kind=kind, **options)
        return teacher, student

    return build


@pytest.fixture
def text(tiny_ids):
    """A running text of `n` token ids (any id of the vocabulary, the specials included)."""
    return lambda n=256, seed=1: tiny_ids(n, seed=seed, low=0)


def snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("family", ["qwen3", "llama"])
def test_converted_layers_move_toward_the_original_and_nothing_else_changes(family, pair, text):
    teacher, student = pair(family, layers=(0, 2))
    t0, s0 = snapshot(teacher), snapshot(student)
    report = attention_transfer(teacher, student, text(), window=32, steps=40, lr=3e-3, progress=False)
    assert report["windows"] == 8 and report["steps"] == 40 and sorted(report["layers"]) == [0, 2]
    for i, errors in report["layers"].items():
        # the untrained GLA layer is far off (its state is an unnormalised sum): 300-600x the target's size
        assert errors["after"] < 0.05 * errors["before"] and not errors["restored"], (i, errors)
    for n, p in teacher.named_parameters():
        assert torch.equal(p, t0[n]), n
    changed = {n for n, p in student.named_parameters() if not torch.equal(p, s0[n])}
    assert changed and all(
        n.startswith(("model.layers.0.self_attn.", "model.layers.2.self_attn.")) for n in changed
    )
    # gradients cleared, flags and eval mode as they were
    assert all(p.grad is None and p.requires_grad for p in student.parameters())
    assert not student.training


def test_a_layer_that_gets_worse_gets_its_parameters_back(pair, text):
    # a random tiny Llama attends almost uniformly, which softmax-feature linear attention already matches
    # (relative error ~1e-6); a large learning rate only moves it away
    teacher, student = pair("llama", layers=(0, 2), kind="linear")
    s0 = snapshot(student)
    report = attention_transfer(teacher, student, text(), window=32, steps=20, lr=3e-2, progress=False)
    for errors in report["layers"].values():
        assert errors["restored"] and errors["after"] >= errors["before"]
    assert all(torch.equal(p, s0[n]) for n, p in student.named_parameters())


def test_windows_as_rows_or_as_a_running_text_train_alike_in_batches(pair, text):
    # the same two windows given as [2, T] rows or as one [2T] text, two windows per step: the same step
    teacher, student = pair(layers=(1,))
    twin = copy.deepcopy(student)
    windows = text(64).view(2, 32)
    attention_transfer(teacher, student, windows, steps=1, batch_size=2, progress=False)
    attention_transfer(teacher, twin, windows.reshape(-1), window=32, steps=1, batch_size=2, progress=False)
    for (n, a), b in zip(student.named_parameters(), twin.parameters()):
        assert torch.equal(a, b), n
    report = attention_transfer(teacher, student, windows, steps=3, batch_size=3, progress=False)
    assert report["batch_size"] == 3  # more than the windows: they repeat, cycling
    with pytest.raises(ValueError, match="batch_size"):
        attention_transfer(teacher, student, windows, batch_size=0, progress=False)


def test_flags_gradients_and_modes_are_left_as_they_were(pair, text):
    teacher, student = pair(layers=(0, 1))
    teacher.train()
    student.train()
    frozen = student.model.layers[0].self_attn.q_proj.weight
    frozen.requires_grad_(False)
    earlier = torch.full_like(student.model.layers[1].self_attn.o_proj.weight, 7.0)
    student.model.layers[1].self_attn.o_proj.weight.grad = earlier
    attention_transfer(teacher, student, text(), window=32, steps=5, progress=False)
    assert teacher.training and student.training and student.model.layers[0].self_attn.training
    assert not frozen.requires_grad
    assert student.model.layers[1].self_attn.o_proj.weight.grad is earlier
    assert all(p.requires_grad for n, p in student.named_parameters() if p is not frozen)


def test_an_interrupted_call_puts_back_the_layer_it_was_training(pair, text):
    teacher, student = pair(layers=(0, 2))
    s0 = snapshot(student)
    calls = []

    def interrupt(module, args, kwargs, output):
        calls.append(1)
        if len(calls) == 8 + 3:  # layer 0's 8 "before" windows, then 3 training steps
            raise KeyboardInterrupt

    hook = student.model.layers[0].self_attn.register_forward_hook(interrupt, with_kwargs=True)
    with pytest.raises(KeyboardInterrupt):
        attention_transfer(teacher, student, text(), window=32, steps=40, progress=False)
    hook.remove()
    assert all(torch.equal(p, s0[n]) for n, p in student.named_parameters())
    assert all(p.grad is None and p.requires_grad for p in student.parameters())


def test_recordings_kept_elsewhere_train_the_same(pair, text):
    teacher, student = pair(layers=(1,))
    twin = copy.deepcopy(student)
    attention_transfer(teacher, student, text(), window=32, steps=5, progress=False)
    attention_transfer(teacher, twin, text(), window=32, steps=5, record_device="cpu", progress=False)
    for (n, a), b in zip(student.named_parameters(), twin.parameters()):
        assert torch.equal(a, b), n


def test_a_float32_teacher_teaches_a_bf16_student(pair, text):
    teacher, student = pair(layers=(1,))
    student = student.to(torch.bfloat16)
    report = attention_transfer(teacher, student, text(), window=32, steps=10, progress=False)
    assert report["layers"][1]["after"] < report["layers"][1]["before"]
    assert student.model.layers[1].self_attn.q_proj.weight.dtype == torch.bfloat16


def test_train_new_keeps_the_pretrained_projections(pair, text):
    teacher, student = pair(layers=(1,))
    s0 = snapshot(student)
    report = attention_transfer(teacher, student, text(), window=32, steps=20, train="new", progress=False)
    assert report["layers"][1]["after"] < report["layers"][1]["before"]
    attn = "model.layers.1.self_attn."
    for part in swaa.convert.transfer.PRETRAINED_PARTS:
        for n, p in student.named_parameters():
            if n.startswith(attn + part + "."):
                assert torch.equal(p, s0[n]), n
    assert not torch.equal(student.model.layers[1].self_attn.gk_proj[1].bias, s0[attn + "gk_proj.1.bias"])


def test_the_trained_hybrid_still_generates_with_and_without_cache(pair, text):
    teacher, student = pair(layers=(0, 1, 2))
    attention_transfer(teacher, student, text(), window=32, steps=10, progress=False)
    prompt = text(7, seed=5)[None]
    with torch.no_grad():
        a = student.generate(prompt, max_new_tokens=6, do_sample=False, use_cache=True, pad_token_id=0)
        b = student.generate(prompt, max_new_tokens=6, do_sample=False, use_cache=False, pad_token_id=0)
    assert torch.equal(a, b)


@pytest.mark.parametrize(
    "kwargs, err, words",
    [
        (dict(steps=0), ValueError, "steps"),
        (dict(steps=2.5), TypeError, "steps"),  # a wrong type is a TypeError, as everywhere in swaa
        (dict(lr=0.0), ValueError, "lr"),
        (dict(lr=float("nan")), ValueError, "lr"),
        (dict(train="some"), ValueError, "train"),
        (dict(window=1), ValueError, "window"),
        (dict(max_windows=0), ValueError, "max_windows"),
    ],
)
def test_bad_arguments_are_refused_before_anything_changes(kwargs, err, words, pair, text):
    teacher, student = pair()
    s0 = snapshot(student)
    with pytest.raises(err, match=words):
        attention_transfer(teacher, student, text(), **{"window": 32, **kwargs}, progress=False)
    assert all(torch.equal(p, s0[n]) for n, p in student.named_parameters())


def test_wrong_pairs_and_inputs_are_refused(pair, text, tiny_model):
    teacher, student = pair()
    with pytest.raises(ValueError, match="hybrid"):
        attention_transfer(teacher, copy.deepcopy(teacher), text(), progress=False)
    with pytest.raises(ValueError, match="already linear"):
        attention_transfer(student, student, text(), progress=False)
    with pytest.raises(TypeError, match="input_ids"):
        attention_transfer(teacher, student, text().float(), progress=False)
    with pytest.raises(ValueError, match="at least"):
        attention_transfer(teacher, student, text(10), window=32, progress=False)
    with pytest.raises(ValueError, match="at least one window"):
        attention_transfer(teacher, student, text(0).view(0, 32), progress=False)
    other = tiny_model("qwen3", num_hidden_layers=LAYERS + 1)
    with pytest.raises(ValueError, match="num_hidden_layers"):
        attention_transfer(other, student, text(), progress=False)
    # a layer with nothing new to train (gate from the keys, no output norm) and train="new"
    teacher, student = pair(layers=(0, 1), gate="from_keys", output_norm=False)
    s0 = snapshot(student)
    with pytest.raises(ValueError, match="no new parameters"):
        attention_transfer(teacher, student, text(), window=32, train="new", progress=False)
    assert all(torch.equal(p, s0[n]) for n, p in student.named_parameters())
