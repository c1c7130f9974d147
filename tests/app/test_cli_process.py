"""The swaa command through its real entry point in a subprocess (issue 11): Ctrl-C during attention
transfer leaves no OUT and ends with one line and status 130; a damaged checkpoint is one line and
status 1, no traceback."""

import os
import signal
import subprocess
import sys
import threading
import time

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from swaa.app.demo import default_text_path

WORDS = sorted(set(default_text_path().read_text(encoding="utf-8").split()))[:200]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tiny_model):
    """A tiny random Llama with a word-level tokenizer (unknown words map to one id)."""
    vocab = {w: i for i, w in enumerate(["<pad>", "<eos>", "<bos>", *WORDS])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>")
    folder = tmp_path_factory.mktemp("tiny-llama")
    tiny_model("llama", vocab_size=len(vocab)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def swaa(*argv, **kwargs):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("SWAA_DEBUG", None)
    return subprocess.Popen(
        [sys.executable, "-m", "swaa", *map(str, argv)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        **kwargs,
    )


def last_line(stderr: str) -> str:
    return stderr.strip().replace("\r", "\n").splitlines()[-1]


def test_ctrl_c_during_attention_transfer_leaves_no_out_and_says_so(checkpoint, tmp_path):
    text = tmp_path / "text.txt"
    text.write_text(default_text_path().read_text(encoding="utf-8"), encoding="utf-8")
    out = tmp_path / "hybrid"
    proc = swaa(
        "convert", checkpoint, out, "--linear-layers", "last:1", "--transfer-text", text,
        "--transfer-steps", "1000000", "--transfer-windows", "2",
    )  # fmt: skip
    stderr = []
    reader = threading.Thread(target=lambda: stderr.extend(iter(lambda: proc.stderr.read(1), "")))
    reader.start()
    deadline = time.monotonic() + 240
    while "attention transfer: layer 3" not in "".join(stderr):
        assert proc.poll() is None, "".join(stderr)
        assert time.monotonic() < deadline, "attention transfer never started: " + "".join(stderr)
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    code = proc.wait(timeout=120)
    reader.join(timeout=10)
    err = "".join(stderr)
    assert code == 130, err
    assert last_line(err) == "swaa convert: interrupted, nothing written"
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["text.txt"]  # no temporary folder left either


def test_a_truncated_safetensors_file_is_one_line_through_the_entry_point(checkpoint, tmp_path):
    import shutil

    folder = tmp_path / "damaged"
    shutil.copytree(checkpoint, folder)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-500])
    for argv in (["info", folder], ["generate", folder, "--prompt", "Hello"]):
        proc = swaa(*argv)
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 1, err
        assert "Traceback" not in err
        line = last_line(err)
        assert line.startswith(f"swaa {argv[0]}: error: {weights}: not a readable safetensors file"), line
