"""The swaa command end to end on a tiny checkpoint in a temp dir: convert, generate, eval, info, and the
one-line errors (missing path, unconvertible model, bad layer indices, an existing OUT)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

from swaa.app.cli import main
from swaa.app.demo import default_text_path
from swaa.app.evaluate import answer
from swaa.convert import convert_to_hybrid

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def tiny_tokenizer():
    """A small byte-level BPE (the byte alphabet, the specials and 20 merges), trained on the shipped text, with a chat template."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|pad|>", "<|endoftext|>", "<|startoftext|>", "<|im_start|>", "<|im_end|>"]
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(
        vocab_size=len(alphabet) + len(specials) + 20, special_tokens=specials, initial_alphabet=alphabet
    )
    tok.train_from_iterator([default_text_path().read_text(encoding="utf-8")[:20000]], trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<|pad|>", eos_token="<|endoftext|>", bos_token="<|startoftext|>"
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tiny_model):
    """A tiny random Llama with a real tokenizer, saved like a downloaded checkpoint."""
    tokenizer = tiny_tokenizer()
    folder = tmp_path_factory.mktemp("tiny-llama")
    model = tiny_model("llama", vocab_size=len(tokenizer), num_hidden_layers=4)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code, err, *words):
    assert code == 1
    # progress bars of a model load may come first; the error is the last line and a single line
    line = err.strip().replace("\r", "\n").splitlines()[-1]
    assert line.startswith("swaa ") and ": error: " in line, err
    assert err.count(": error: ") == 1
    for w in words:
        assert w in line, (w, line)


def test_convert_writes_a_hybrid_that_loads_with_the_same_logits(checkpoint, tmp_path, capsys, tiny_ids):
    out_dir = tmp_path / "hybrid"
    code, out, err = run(
        capsys, "convert", checkpoint, out_dir, "--linear-layers", "every:2", "--option", "gate=from_keys"
    )
    assert code == 0, err
    assert "2 of 4 layers gla [0, 2]" in out
    config = json.loads((out_dir / "config.json").read_text())
    assert config["model_type"] == "swaa_llama"
    assert config["swaa_hybrid"]["options"] == {"gate": "from_keys"}
    assert (out_dir / "model.safetensors").is_file() and (out_dir / "tokenizer.json").is_file()
    # nothing but OUT itself is left in its parent (the temporary folder was renamed into place)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hybrid"]

    expected = AutoModelForCausalLM.from_pretrained(checkpoint).eval()
    convert_to_hybrid(expected, "every:2", gate="from_keys")
    loaded = AutoModelForCausalLM.from_pretrained(out_dir).eval()
    x = tiny_ids(1, 9)
    assert torch.equal(loaded(x).logits, expected(x).logits)


def test_convert_into_an_empty_existing_folder(checkpoint, tmp_path, capsys):
    out_dir = tmp_path / "empty"
    out_dir.mkdir()
    code, _, err = run(capsys, "convert", checkpoint, out_dir, "--linear-layers", "1", "--kind", "linear")
    assert code == 0, err
    assert json.loads((out_dir / "config.json").read_text())["swaa_hybrid"]["kind"] == "linear"


@pytest.mark.parametrize(
    "args, words",
    [
        (["--linear-layers", "0,7"], ["layer 7 is out of range for a model with 4 layers"]),
        (["--linear-layers", "every:0"], ["every:N"]),
        (["--linear-layers", "0", "--option", "nonsense"], ["KEY=VALUE", "nonsense"]),
        (["--linear-layers", "0", "--option", "gate=sideways"], ["gate must be one of"]),
        # JSON spells it `false`; Python's `False` stays a string, which must not pass for a truthy flag
        (
            ["--linear-layers", "0", "--option", "output_norm=False"],
            ["output_norm must be a bool", "'False'"],
        ),
    ],
)
def test_convert_errors_leave_nothing_at_out(checkpoint, tmp_path, capsys, args, words):
    out_dir = tmp_path / "never"
    code, _, err = run(capsys, "convert", checkpoint, out_dir, *args)
    assert_one_line_error(code, err, *words)
    assert list(tmp_path.iterdir()) == []


def test_convert_refuses_a_missing_source_and_an_existing_out(checkpoint, tmp_path, capsys):
    code, _, err = run(capsys, "convert", tmp_path / "nope", tmp_path / "out", "--linear-layers", "0")
    assert_one_line_error(code, err, "no such file or folder", "nope")
    assert not (tmp_path / "out").exists()

    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "keep.txt").write_text("mine")
    code, _, err = run(capsys, "convert", checkpoint, taken, "--linear-layers", "0")
    assert_one_line_error(code, err, "already exists")
    assert sorted(p.name for p in taken.iterdir()) == ["keep.txt"]

    not_a_checkpoint = tmp_path / "plain"
    not_a_checkpoint.mkdir()
    code, _, err = run(capsys, "convert", not_a_checkpoint, tmp_path / "out2", "--linear-layers", "0")
    assert_one_line_error(code, err, "no config.json")


def test_an_empty_model_argument_is_not_the_current_folder(capsys):
    code, _, err = run(capsys, "info", "")
    assert_one_line_error(code, err, "no such file or folder: ''")


def test_convert_refuses_an_unsupported_model(tmp_path, capsys):
    src = tmp_path / "gpt2"
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(n_embd=16, n_layer=2, n_head=2, vocab_size=50)).save_pretrained(src)
    code, _, err = run(capsys, "convert", src, tmp_path / "out", "--linear-layers", "0")
    assert_one_line_error(code, err, "'gpt2' cannot be converted", "qwen3", "llama")
    assert not (tmp_path / "out").exists()


def test_generate_uses_the_chat_template_and_converts_on_the_fly(checkpoint, capsys):
    code, out, err = run(capsys, "generate", checkpoint, "--prompt", "Hello", "--max-new-tokens", "5")
    assert code == 0, err
    assert out.strip()
    # the greedy reply through the chat template, as the library's own helper gives it
    model = AutoModelForCausalLM.from_pretrained(checkpoint).eval()
    tokenizer = PreTrainedTokenizerFast.from_pretrained(checkpoint)
    assert out.strip() == answer(model, tokenizer, "Hello", max_new_tokens=5)
    code, out_hybrid, err = run(
        capsys, "generate", checkpoint, "--prompt", "Hello", "--max-new-tokens", "5", "--linear-layers", "all"
    )
    assert code == 0, err
    code, sampled, err = run(
        capsys,
        "generate",
        checkpoint,
        "--prompt",
        "Hi",
        "--max-new-tokens",
        "4",
        "--sample",
        "--seed",
        "3",
        "--no-chat",
    )
    assert code == 0, err
    code, again, err = run(
        capsys, "generate", checkpoint, "--prompt", "Hi", "--max-new-tokens", "4", "--sample", "--seed", "3",
        "--no-chat",
    )  # fmt: skip
    assert code == 0, err
    assert again == sampled
    code, beams, err = run(
        capsys, "generate", checkpoint, "--prompt", "Hi", "--max-new-tokens", "4", "--num-beams", "2"
    )
    assert code == 0, err


def test_generate_on_a_checkpoint_without_tokenizer_is_a_one_line_error(tmp_path, capsys, tiny_model):
    tiny_model("qwen3").save_pretrained(tmp_path)
    code, _, err = run(capsys, "generate", tmp_path, "--prompt", "Hello")
    assert_one_line_error(code, err, "tokenizer")


def test_eval_reports_perplexity_on_a_text_file(checkpoint, tmp_path, capsys):
    text = tmp_path / "text.txt"
    text.write_text(default_text_path().read_text(encoding="utf-8")[:3000], encoding="utf-8")
    code, out, err = run(capsys, "eval", checkpoint, "--text", text, "--window", "64", "--max-windows", "3")
    assert code == 0, err
    assert "over 189 predicted tokens in 3 window(s) of 64" in out
    ppl = float(out.split()[1])
    # the same number from first principles: each 64-token window scored alone, mean next-token NLL
    from transformers import AutoTokenizer

    from swaa.app.evaluate import tokenize_text

    model = AutoModelForCausalLM.from_pretrained(checkpoint).eval()
    ids = tokenize_text(AutoTokenizer.from_pretrained(checkpoint), text.read_text(encoding="utf-8"))
    nll = []
    with torch.no_grad():
        for w in range(3):
            chunk = ids[w * 64 : (w + 1) * 64].unsqueeze(0)
            logits = model(chunk).logits[0, :-1].float()
            nll.append(torch.nn.functional.cross_entropy(logits, chunk[0, 1:], reduction="none"))
    expected = torch.cat(nll).mean().exp().item()
    assert ppl == pytest.approx(expected, rel=1e-3)

    code, _, err = run(capsys, "eval", checkpoint, "--text", tmp_path / "missing.txt")
    assert_one_line_error(code, err, "--text", "missing.txt")


def test_info_lists_layers_and_cache_bytes(checkpoint, tmp_path, capsys):
    code, out, err = run(capsys, "info", checkpoint, "--linear-layers", "0,1", "--tokens", "1000")
    assert code == 0, err
    rows = [line.split() for line in out.splitlines() if line.strip()[:1].isdigit()]
    assert [r[1] for r in rows] == ["gla", "gla", "softmax", "softmax"]
    # float32 keys + values of 2 KV heads x 8 dims: 2 * 2 * 8 * 4 = 128 bytes per token per softmax layer
    assert [int(r[2]) for r in rows] == [0, 0, 128, 128]
    assert all(int(r[3]) > 0 for r in rows[:2]) and all(int(r[3]) == 0 for r in rows[2:])
    assert "at 1000 tokens" in out


def test_python_dash_m_swaa_runs_the_same_command():
    result = subprocess.run(
        [sys.executable, "-m", "swaa", "info", "/definitely/not/here"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 1
    assert result.stderr.strip() == "swaa info: error: no such file or folder: '/definitely/not/here'"
    result = subprocess.run(
        [sys.executable, "-m", "swaa", "--help"], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0
    for command in ("convert", "generate", "eval", "info", "demo"):
        assert command in result.stdout


def test_demo_runs_on_any_checkpoint_with_model(checkpoint, tmp_path, capsys):
    text = tmp_path / "text.txt"
    text.write_text(default_text_path().read_text(encoding="utf-8")[:2000], encoding="utf-8")
    code, out, err = run(
        capsys, "demo", "--model", checkpoint, "--linear-layers", "last:2", "--window", "32", "--windows", "9999",
        "--max-new-tokens", "3", "--text", text, "--transfer-steps", "0",
    )  # fmt: skip
    assert code == 0, err
    # the windows actually scored, not the number asked for
    tokens = PreTrainedTokenizerFast.from_pretrained(checkpoint)(text.read_text(), add_special_tokens=False)
    windows = len(tokens["input_ids"]) // 32
    assert f"{windows * 31} predicted tokens of text.txt, {windows} window(s) of 32" in out
    assert "converted 2 of 4 layers to swa_gla ('last:2'): [2, 3]" in out  # the demo's kind
    table = {
        line.split("  ")[0].strip(): line.split()
        for line in out.splitlines()
        if line.startswith(("perplexity ", "softmax"))
    }
    assert table["softmax layers"][-2:] == ["4", "2"]
    assert "Untrained, the hybrid's perplexity is" in out and "attention transfer" not in out
    # half the layers keep KV, so the hybrid's cache at 4096 tokens is about half the original's
    cache_line = next(line for line in out.splitlines() if line.startswith("cache at 4096"))
    original, hybrid = (float(v) for v in cache_line.split()[5::2])
    assert 0.45 < hybrid / original < 0.6


def test_demo_with_attention_transfer_learns_from_another_source_than_it_scores(
    checkpoint, tmp_path, capsys, monkeypatch
):
    import swaa.convert.distill_data

    text = tmp_path / "text.txt"
    text.write_text(default_text_path().read_text(encoding="utf-8")[:4000], encoding="utf-8")
    small = ("--window", "32", "--windows", "3", "--max-new-tokens", "3", "--text", text)
    code, out, err = run(
        capsys, "demo", "--model", checkpoint, "--linear-layers", "last:2", *small,
        "--transfer-steps", "15", "--transfer-windows", "5",
    )  # fmt: skip
    assert code == 0, err
    # the default: the Debian licence texts, never the text the perplexity is measured on
    assert (
        "attention transfer: 15 steps per layer on 5 window(s) of 32 tokens of the Debian licence texts"
        in out
    )
    header = next(line for line in out.splitlines() if "original" in line and "transferred" in line)
    assert header.split() == ["original", "hybrid,", "untrained", "hybrid,", "transferred"]
    perplexities = next(line for line in out.splitlines() if line.startswith("perplexity ")).split()[1:]
    assert len(perplexities) == 3
    other = tmp_path / "other.txt"
    other.write_text("Completely different prose about lighthouses and the sea. " * 60, encoding="utf-8")
    code, out, err = run(
        capsys, "demo", "--model", checkpoint, *small, "--transfer-steps", "2", "--transfer-text", other
    )  # fmt: skip
    assert code == 0, err
    assert f"of 32 tokens of {other}" in out
    # too little text after the scored windows, or a bad learning rate: refused before the weights load
    code, out, err = run(
        capsys, "demo", "--model", checkpoint, "--window", "32", "--windows", "9999", "--text", text,
        "--transfer-text", "after",
    )  # fmt: skip
    assert_one_line_error(code, err, "attention transfer needs at least 32 tokens", "--transfer-steps 0")
    assert "loading" not in out
    code, out, err = run(capsys, "demo", "--model", checkpoint, "--transfer-lr", "0", "--text", text)
    assert_one_line_error(code, err, "lr must be a positive number, got 0.0")
    assert "loading" not in out

    # a machine without Debian's licence texts: the default says it learns after the scored windows;
    # asking for them by name is refused before the weights load
    def missing():
        raise FileNotFoundError("no readable text under /usr/share/common-licenses")

    monkeypatch.setattr(swaa.convert.distill_data, "debian_prose", missing)
    code, out, err = run(capsys, "demo", "--model", checkpoint, *small, "--transfer-steps", "2")
    assert code == 0, err
    assert "of the scored text after its scored windows (no Debian licence texts here)" in out
    code, out, err = run(capsys, "demo", "--model", checkpoint, *small, "--transfer-text", "debian")
    assert_one_line_error(code, err, "common-licenses")
    assert "loading" not in out


def test_convert_with_attention_transfer_saves_the_trained_layers(checkpoint, tmp_path, capsys):
    text = tmp_path / "text.txt"
    text.write_text(default_text_path().read_text(encoding="utf-8")[:3000], encoding="utf-8")
    plain, trained = tmp_path / "plain", tmp_path / "trained"
    assert run(capsys, "convert", checkpoint, plain, "--linear-layers", "last:1")[0] == 0
    code, out, err = run(
        capsys, "convert", checkpoint, trained, "--linear-layers", "last:1", "--transfer-text", text,
        "--transfer-steps", "10", "--transfer-windows", "2",
    )  # fmt: skip
    assert code == 0, err
    assert "attention transfer, layer 3: relative error" in out
    a = AutoModelForCausalLM.from_pretrained(plain).state_dict()
    b = AutoModelForCausalLM.from_pretrained(trained).state_dict()
    changed = sorted(k for k in a if not torch.equal(a[k], b[k]))
    assert changed and all(k.startswith("model.layers.3.self_attn.") for k in changed)
    code, out, err = run(
        capsys, "convert", checkpoint, tmp_path / "x", "--linear-layers", "last:1", "--transfer-text", tmp_path / "no.txt"
    )  # fmt: skip
    assert_one_line_error(code, err, "--transfer-text: no such file")
    assert not (tmp_path / "x").exists()
    short = tmp_path / "short.txt"
    short.write_text("too short", encoding="utf-8")
    for extra, words in (
        (["--transfer-text", short], "--transfer-text: input_ids: need at least window=512 tokens"),
        (["--transfer-text", text, "--transfer-lr", "inf"], "--transfer-lr must be a positive number"),
        (["--transfer-lr", "0.1"], "--transfer-lr needs --transfer-text"),
    ):
        code, out, err = run(
            capsys, "convert", checkpoint, tmp_path / "x", "--linear-layers", "last:1", *extra
        )
        assert_one_line_error(code, err, words)
        assert not (tmp_path / "x").exists()


# issue 11: refused early, in one line, naming the flag or the file


def unwritable_parent(tmp_path):
    """A folder nobody here may create folders in (root may write anywhere but /sys)."""
    import os

    if os.getuid() == 0:
        return Path("/sys")
    folder = tmp_path / "read-only"
    folder.mkdir()
    folder.chmod(0o500)
    return folder


def test_convert_checks_out_before_it_loads_anything(tmp_path, capsys, monkeypatch):
    import swaa.app.loading

    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded before OUT was checked")

    monkeypatch.setattr(swaa.app.loading, "load_model", no_loading)
    monkeypatch.setattr(swaa.app.loading, "load_config", no_loading)
    out = unwritable_parent(tmp_path) / "hybrid"
    # SRC does not even exist: OUT is what is checked first, and the message names it
    code, _, err = run(capsys, "convert", tmp_path / "no-such-src", out, "--linear-layers", "0")
    assert_one_line_error(code, err, f"OUT {str(out)!r}: cannot write into")
    assert "swaa-probe" not in err and "swaa-tmp" not in err
    file = tmp_path / "a-file"
    file.write_text("x")
    code, _, err = run(
        capsys, "convert", tmp_path / "no-such-src", file / "sub" / "out", "--linear-layers", "0"
    )
    assert_one_line_error(code, err, "is a file, not a folder")


def test_a_failed_save_names_out_not_the_temporary_folder(checkpoint, tmp_path, capsys, monkeypatch):
    from transformers import modeling_utils

    def full_disk(self, folder, *args, **kwargs):
        raise OSError(28, "No space left on device", str(folder) + "/model.safetensors")

    monkeypatch.setattr(modeling_utils.PreTrainedModel, "save_pretrained", full_disk)
    out = tmp_path / "hybrid"
    code, _, err = run(capsys, "convert", checkpoint, out, "--linear-layers", "0")
    assert_one_line_error(code, err, f"OUT {str(out)!r}: could not write the model (No space left on device)")
    assert "swaa-tmp" not in err
    assert list(tmp_path.iterdir()) == []


def test_out_gets_the_users_umask_and_an_existing_out_keeps_its_mode(checkpoint, tmp_path, capsys):
    import os
    import stat

    old = os.umask(0o022)
    try:
        assert run(capsys, "convert", checkpoint, tmp_path / "new", "--linear-layers", "0")[0] == 0
        existing = tmp_path / "existing"
        existing.mkdir(mode=0o750)
        existing.chmod(0o750)
        assert run(capsys, "convert", checkpoint, existing, "--linear-layers", "0")[0] == 0
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "new").stat().st_mode) == 0o755  # was 0700, from mkdtemp
    assert stat.S_IMODE(existing.stat().st_mode) == 0o750


@pytest.mark.parametrize(
    "argv, words",
    [
        (["--num-beams", "0"], ["--num-beams must be >= 1, got 0"]),
        (["--top-p", "2"], ["--top-p must be in (0, 1], got 2.0"]),
        (["--temperature", "0"], ["--temperature must be > 0"]),
        (["--prompt", "", "--no-chat"], ["--prompt is empty"]),
        (["--linear-layers", ""], ["--linear-layers is empty"]),
        (["--linear-layers", "0,9"], ["layer 9 is out of range for a model with 4 layers"]),
        (["--linear-layers", "0", "--option", "gate=sideways"], ["gate must be one of"]),
        (["--linear-layers", "0", "--option", "nonsense_option=1"], ["does not accept", "nonsense_option"]),
    ],
)
def test_generate_refuses_bad_flags_in_one_line_before_loading(checkpoint, capsys, monkeypatch, argv, words):
    import swaa.app.loading

    def no_loading(*args, **kwargs):
        raise AssertionError("weights were loaded before the flags were checked")

    monkeypatch.setattr(swaa.app.loading, "load_model", no_loading)
    prompt = [] if "--prompt" in argv else ["--prompt", "Hi"]
    code, _, err = run(capsys, "generate", checkpoint, *prompt, *argv)
    assert_one_line_error(code, err, *words)


@pytest.mark.parametrize("command", [["convert", "{ckpt}", "{out}"], ["eval", "{ckpt}"], ["info", "{ckpt}"]])
def test_an_empty_linear_layers_flag_is_refused(command, checkpoint, tmp_path, capsys):
    argv = [a.format(ckpt=checkpoint, out=tmp_path / "out") for a in command]
    code, _, err = run(capsys, *argv, "--linear-layers", "")
    assert_one_line_error(code, err, "--linear-layers is empty", "'none' converts nothing")
    assert not (tmp_path / "out").exists()


def test_negative_layer_indices_count_from_the_end(checkpoint, tmp_path, capsys):
    code, out, err = run(capsys, "convert", checkpoint, tmp_path / "last", "--linear-layers", "-1")
    assert code == 0, err
    assert "1 of 4 layers gla [3]" in out
    code, out, err = run(capsys, "convert", checkpoint, tmp_path / "ends", "--linear-layers=0,-1")
    assert code == 0, err
    assert "2 of 4 layers gla [0, 3]" in out
    code, _, err = run(capsys, "convert", checkpoint, tmp_path / "x", "--linear-layers", "-5")
    assert_one_line_error(code, err, "layer -5 is out of range", "-4..-1 counting from the end")


def test_a_non_utf8_text_is_named_with_its_flag(checkpoint, tmp_path, capsys):
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("caf\xe9 au lait ".encode("latin-1") * 50)
    code, _, err = run(capsys, "eval", checkpoint, "--text", latin1)
    assert_one_line_error(code, err, f"--text: {str(latin1)!r} is not UTF-8 text (byte 3")
    code, _, err = run(
        capsys, "convert", checkpoint, tmp_path / "out", "--linear-layers", "0", "--transfer-text", latin1
    )
    assert_one_line_error(code, err, "--transfer-text:", "latin1.txt", "is not UTF-8 text")
    assert not (tmp_path / "out").exists()


def test_a_bare_name_offline_fails_at_once(capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code, _, err = run(capsys, "info", "surely-no-such-model-id")
    assert_one_line_error(
        code, err, "'surely-no-such-model-id' is no local file or folder", "not in the local cache"
    )


def test_a_bare_name_with_the_hub_unreachable_fails_at_once(capsys, monkeypatch):
    import socket

    def unreachable(*args, **kwargs):
        raise socket.gaierror(-2, "Name or service not known")

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    for proxy in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(proxy, raising=False)
    monkeypatch.setattr(socket, "create_connection", unreachable)
    code, _, err = run(capsys, "info", "surely-no-such-model-id")
    assert_one_line_error(code, err, "neither in the local cache nor downloadable", "cannot be reached")


def test_convert_is_reproducible_and_records_its_seed(checkpoint, tmp_path, capsys):
    from safetensors.torch import load_file

    for name, seed in (("a", []), ("b", []), ("c", ["--seed", "1"])):
        assert run(capsys, "convert", checkpoint, tmp_path / name, "--linear-layers", "1,3", *seed)[0] == 0
    a, b, c = (load_file(tmp_path / n / "model.safetensors") for n in "abc")
    assert all(torch.equal(a[k], b[k]) for k in a)
    gates = [k for k in a if "gk_proj" in k]
    assert gates and any(not torch.equal(a[k], c[k]) for k in gates)
    assert json.loads((tmp_path / "a" / "config.json").read_text())["swaa_hybrid"]["seed"] == 0
    assert json.loads((tmp_path / "c" / "config.json").read_text())["swaa_hybrid"]["seed"] == 1


@pytest.mark.real_model
def test_a_gguf_source_is_checked_before_its_weights_load(tmp_path, capsys, monkeypatch):
    pytest.importorskip("gguf")
    import swaa.app.loading
    from swaa.app.loading import default_demo_source

    try:
        source = default_demo_source()
    except (ModuleNotFoundError, FileNotFoundError) as err:
        pytest.skip(str(err))

    def no_loading(*args, **kwargs):
        raise AssertionError("the GGUF weights were loaded before the flags were checked")

    monkeypatch.setattr(swaa.app.loading, "load_model", no_loading)
    gguf = str(source)
    for extra, words in (
        (["--linear-layers", "99"], "layer 99 is out of range for a model with 30 layers"),
        (["--linear-layers", "0", "--option", "gate=sideways"], "gate must be one of"),
    ):
        code, _, err = run(capsys, "convert", gguf, tmp_path / "out", *extra)
        assert_one_line_error(code, err, words)
    assert not (tmp_path / "out").exists()


def test_demo_checks_the_layers_against_the_config_before_loading(checkpoint, capsys, monkeypatch):
    import swaa.app.demo

    def no_loading(*args, **kwargs):
        raise AssertionError("the demo loaded the weights before checking --linear-layers")

    monkeypatch.setattr(swaa.app.demo, "load_model", no_loading)
    code, out, err = run(
        capsys, "demo", "--model", checkpoint, "--linear-layers", "7", "--transfer-steps", "0"
    )
    assert_one_line_error(code, err, "layer 7 is out of range for a model with 4 layers")
    assert "loading" not in out
