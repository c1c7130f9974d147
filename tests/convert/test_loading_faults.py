"""Fault injection on loading (issue 11): a saved hybrid with one thing wrong in its files is refused
by transformers' ``from_pretrained`` (where swaa's classes are the ones loading), by swaa's loader and by
the CLI, with one line that names the file and what is wrong, and nothing on disk changes. Before, most
of these loaded with exit 0 and freshly initialised layers. ``tests/README.md`` lists the bad inputs
covered; a new one goes into ``FAULTS``."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from swaa.app.cli import main
from swaa.app.loading import load_model
from swaa.convert import convert_to_hybrid

WEIGHTS, CONFIG = "model.safetensors", "config.json"


@pytest.fixture(scope="module")
def saved(tmp_path_factory, tiny_model):
    """A tiny Llama hybrid, layers 1 and 3 GLA, saved as convert_to_hybrid + save_pretrained write it."""
    folder = tmp_path_factory.mktemp("hybrid") / "ok"
    convert_to_hybrid(tiny_model("llama"), [1, 3]).save_pretrained(folder)
    return folder


def weights(edit):
    def apply(folder):
        tensors = load_file(folder / WEIGHTS)
        edit(tensors)
        save_file(tensors, folder / WEIGHTS, metadata={"format": "pt"})

    return apply


def config(edit):
    def apply(folder):
        data = json.loads((folder / CONFIG).read_text())
        edit(data)
        (folder / CONFIG).write_text(json.dumps(data))

    return apply


def record(key, value):
    return config(lambda c: c["swaa_hybrid"].__setitem__(key, value))


def truncate(keep):
    def apply(folder):
        data = (folder / WEIGHTS).read_bytes()
        (folder / WEIGHTS).write_bytes(data[: keep if keep > 0 else len(data) + keep])

    return apply


GK_BIAS = "model.layers.1.self_attn.gk_proj.1.bias"

# (fault, words the one-line error must hold besides the file, what transformers' from_pretrained does:
# True refuses with these words (swaa's classes load), "own" refuses in its own words (an unknown model
# type), False loads (a plain model type reaches stock classes, which only swaa's loader checks))
FAULTS = [
    pytest.param(truncate(100), [WEIGHTS, "not a readable safetensors file"], True, id="truncated-header"),
    pytest.param(truncate(-1000), [WEIGHTS, "not a readable safetensors file"], True, id="truncated-body"),
    pytest.param(
        weights(lambda t: t.pop(GK_BIAS)),
        ["layer 1 (gla) has no weights for self_attn.gk_proj.1.bias"],
        True,
        id="missing-tensor",
    ),
    pytest.param(
        weights(lambda t: t.__setitem__("model.layers.0.self_attn.gk_proj.0.weight", torch.zeros(16, 32))),
        ["layer 0 (softmax attention) has no place for the weights self_attn.gk_proj.0.weight"],
        True,
        id="extra-tensor",
    ),
    pytest.param(
        weights(lambda t: t.__setitem__(GK_BIAS, torch.zeros(5))),
        [GK_BIAS, "takes (16,)"],
        True,
        id="wrong-shape",
    ),
    pytest.param(
        record("linear_layers", [0, 2]),
        ["layer 0 (gla) has no weights", "layer 1 (softmax"],
        True,
        id="record-layers",
    ),
    pytest.param(record("kind", "linear"), ["layer 1 (linear) has no place for"], True, id="record-kind"),
    pytest.param(
        record("kind", "mamba"),
        [CONFIG, "swaa_hybrid.kind must be one of", "'mamba'"],
        True,
        id="record-kind-unknown",
    ),
    pytest.param(
        record("linear_layers", "every:2"),
        [CONFIG, "swaa_hybrid.linear_layers must be a list of distinct layer indices in 0..3", "'every:2'"],
        True,
        id="record-pattern",
    ),
    pytest.param(
        record("linear_layers", [999]), [CONFIG, "in 0..3", "[999]"], True, id="record-out-of-range"
    ),
    pytest.param(
        record("options", {"gate": "sideways"}),
        [CONFIG, "swaa_hybrid.options", "gate must be one of"],
        True,
        id="record-options",
    ),
    pytest.param(record("typo", 1), [CONFIG, "unknown ['typo']"], True, id="record-unknown-key"),
    pytest.param(
        config(lambda c: c.__setitem__("swaa_hybrid", None)),
        [CONFIG, "swaa_hybrid must be the conversion record of a swaa_llama model", "got None"],
        True,
        id="record-null",
    ),
    pytest.param(
        config(lambda c: c.pop("swaa_hybrid")),
        [CONFIG, "swaa_hybrid must be the conversion record"],
        True,
        id="record-deleted",
    ),
    pytest.param(
        config(lambda c: c.__setitem__("model_type", "swaa_gpt2")),
        [CONFIG, "model_type 'swaa_gpt2' is no swaa hybrid type", "swaa_llama"],
        "own",
        id="model-type-unknown",
    ),
    pytest.param(
        config(lambda c: c.__setitem__("model_type", "llama")),
        [CONFIG, "model_type is 'llama'", "'swaa_llama'"],
        False,
        id="model-type-plain",
    ),
    pytest.param(
        lambda folder: (folder / CONFIG).write_text("{not json"),
        [CONFIG, "not a JSON config"],
        False,
        id="config-not-json",
    ),
]


def snapshot(folder):
    return {
        p.name: (p.read_bytes(), p.stat().st_mtime_ns)
        for p in sorted(folder.parent.rglob("*"))
        if p.is_file()
    }


@pytest.mark.parametrize("fault, words, transformers_refuses", FAULTS)
def test_a_damaged_hybrid_is_refused_with_one_line_and_nothing_changes(
    fault, words, transformers_refuses, saved, tmp_path, capsys
):
    folder = tmp_path / "hybrid"
    shutil.copytree(saved, folder)
    fault(folder)
    before = snapshot(folder)

    # swaa's loader (what every command uses): the folder or file is named, then what is wrong
    with pytest.raises((OSError, ValueError)) as err:
        load_model(folder)
    message = str(err.value)
    assert str(folder) in message and all(w in message for w in words), message
    if transformers_refuses:
        with pytest.raises((OSError, ValueError)) as err:
            AutoModelForCausalLM.from_pretrained(folder)
        assert transformers_refuses == "own" or all(w in str(err.value) for w in words), str(err.value)

    # the CLI: exit 1, one line on stderr
    code = main(["info", str(folder)])
    stderr = capsys.readouterr().err
    line = stderr.strip().replace("\r", "\n").splitlines()[-1]
    assert code == 1 and stderr.count(": error: ") == 1 and "Traceback" not in stderr, stderr
    assert line.startswith("swaa info: error: ") and all(w in line for w in words), line

    assert snapshot(folder) == before


def test_the_intact_hybrid_loads(saved):
    # the faults above are refusals of a damaged copy, not of the saved hybrid itself
    model = load_model(saved)
    assert type(model).__name__ == "SwaaLlamaForCausalLM"
    assert [type(layer.self_attn).__name__ for layer in model.model.layers][1::2] == [
        "GatedLinearAttention"
    ] * 2
