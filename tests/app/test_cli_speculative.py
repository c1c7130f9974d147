"""`swaa generate --prompt-lookup K` / `--assistant MODEL` (issue 13) on a tiny saved hybrid: the same text
as greedy decoding, and the flags that cannot go together refused in one line before any weights load."""

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from swaa.app.cli import main
from swaa.convert import convert_to_hybrid

WORDS = "the cat sat on a mat and then it ran to see what was there".split()
PROMPT = "the cat sat on a mat and the cat sat on a mat and the cat"


@pytest.fixture(scope="module")
def hybrid(tmp_path_factory, tiny_model):
    """A tiny random Llama hybrid (layers 0 and 2 GLA) with a word-level tokenizer, saved to a folder."""
    vocab = {w: i for i, w in enumerate(["<pad>", "<eos>", "<bos>", *WORDS])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>"
    )
    model = tiny_model("llama", vocab_size=len(vocab), num_hidden_layers=3)
    convert_to_hybrid(model, [0, 2], kind="gla")
    model.generation_config.suppress_tokens = [1]  # no early eos: every run writes all its tokens
    folder = tmp_path_factory.mktemp("tiny-hybrid")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_speculative_flags_give_the_greedy_text(hybrid, capsys):
    base = ("generate", hybrid, "--prompt", PROMPT, "--no-chat", "--max-new-tokens", "12")
    code, greedy, err = run(capsys, *base)
    assert code == 0, err
    assert greedy.strip()
    for extra in (("--prompt-lookup", "3"), ("--assistant", hybrid)):
        code, out, err = run(capsys, *base, *extra)
        assert code == 0, err
        assert out == greedy, extra


@pytest.mark.parametrize(
    "extra, words",
    [
        (("--prompt-lookup", "0"), ["--prompt-lookup", ">= 1"]),
        (("--prompt-lookup", "2", "--assistant", "x"), ["cannot be combined"]),
        (("--prompt-lookup", "2", "--num-beams", "2"), ["--num-beams 2"]),
        (("--assistant", "x", "--cache", "static"), ["--cache dynamic"]),
    ],
)
def test_speculative_flags_that_cannot_work_are_one_line_errors(hybrid, capsys, extra, words):
    code, _, err = run(capsys, "generate", hybrid, "--prompt", "the cat", *extra)
    assert code == 1
    line = err.strip().splitlines()[-1]
    assert line.startswith("swaa ") and ": error: " in line and err.count(": error: ") == 1
    for w in words:
        assert w in line, (w, line)
