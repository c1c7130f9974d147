"""The swaa command end to end on a tiny checkpoint in a temp dir: convert, generate, eval, info, and the
one-line errors (missing path, unconvertible model, bad layer indices, an existing OUT)."""

import json
import subprocess
import sys

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
    assert "converted 2 of 4 layers to gla ('last:2'): [2, 3]" in out
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


def test_demo_with_attention_transfer_learns_after_the_scored_windows(checkpoint, tmp_path, capsys):
    text = tmp_path / "text.txt"
    text.write_text(default_text_path().read_text(encoding="utf-8")[:4000], encoding="utf-8")
    code, out, err = run(
        capsys, "demo", "--model", checkpoint, "--linear-layers", "last:2", "--window", "32", "--windows", "3",
        "--max-new-tokens", "3", "--text", text, "--transfer-steps", "15", "--transfer-windows", "5",
    )  # fmt: skip
    assert code == 0, err
    assert "attention transfer: 15 steps per layer on 5 window(s) of 32 tokens taken after the scored" in out
    header = next(line for line in out.splitlines() if "original" in line and "transferred" in line)
    assert header.split() == ["original", "hybrid,", "untrained", "hybrid,", "transferred"]
    perplexities = next(line for line in out.splitlines() if line.startswith("perplexity ")).split()[1:]
    assert len(perplexities) == 3
    # too little text after the scored windows, or a bad learning rate: refused before the weights load
    code, out, err = run(
        capsys, "demo", "--model", checkpoint, "--window", "32", "--windows", "9999", "--text", text,
    )  # fmt: skip
    assert_one_line_error(code, err, "attention transfer needs at least 32 tokens", "--transfer-steps 0")
    assert "loading" not in out
    code, out, err = run(capsys, "demo", "--model", checkpoint, "--transfer-lr", "0", "--text", text)
    assert_one_line_error(code, err, "lr must be a positive number, got 0.0")
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
