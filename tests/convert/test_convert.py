"""convert_to_hybrid on tiny random Qwen3 and Llama models: layer selection, weight copy, the record in the
config, save/load through AutoModelForCausalLM, and generate() with the hybrid (CPU, torch kernels)."""

import copy
import json
import os

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    DynamicCache,
    GPT2Config,
    GPT2LMHeadModel,
    Qwen3Config,
    Qwen3ForCausalLM,
)

import swaa
from swaa.convert import convert_to_hybrid, hybrid_record, parse_linear_layers
from swaa.layers import GatedLinearAttention, LinearAttention

# generation runs on the two main families; conversion and save/load on every family of the table
families = pytest.mark.parametrize("family", ["qwen3", "llama"])
all_families = pytest.mark.parametrize("family", ["qwen3", "llama", "qwen2", "mistral"])


# layer selection


@pytest.mark.parametrize(
    "spec, expected",
    [
        ("all", [0, 1, 2, 3, 4, 5, 6, 7]),
        ("none", []),
        ("", []),
        ("every:4", [0, 1, 2, 4, 5, 6]),
        ("every:2", [0, 2, 4, 6]),
        ("every:1", []),
        ("last:3", [5, 6, 7]),
        ("first:2", [0, 1]),
        ("last:0", []),
        ("0,2,5-7", [0, 2, 5, 6, 7]),
        (" 3 , 1-2 ", [1, 2, 3]),
        ([5, -1, 5], [5, 7]),
        (range(2), [0, 1]),
        ((), []),
        # negative indices count from the end in the pattern language too, as in a list
        ("-1", [7]),
        ("0,-1", [0, 7]),
        ("1-2,-2", [1, 2, 6]),
    ],
)
def test_parse_linear_layers_forms(spec, expected):
    assert parse_linear_layers(spec, 8) == expected


@pytest.mark.parametrize(
    "spec, error, words",
    [
        ([8], IndexError, "layer 8 is out of range for a model with 8 layers"),
        ([-9], IndexError, r"layer -9 .*valid: 0\.\.7, or -8\.\.-1 counting from the end"),
        ("-9", IndexError, "layer -9"),
        ("-1-2", ValueError, "negative ones count from the end"),
        ("0,9", IndexError, "layer 9"),
        ("every:0", ValueError, "every:N"),
        ("last:9", IndexError, "asks for 9 layers of a model with 8 layers"),
        ("first:-1", ValueError, "first:N"),
        ("every:x", ValueError, "every:N"),
        ("5-3", ValueError, "runs backwards"),
        ("first half", ValueError, "cannot read 'first half'"),
        ([1.5], TypeError, "float"),
        ([True], TypeError, "bool"),
        (3, TypeError, "int"),
    ],
)
def test_parse_linear_layers_errors_name_the_value(spec, error, words):
    with pytest.raises(error, match=words):
        parse_linear_layers(spec, 8)


# conversion


@all_families
def test_empty_conversion_changes_nothing(family, tiny_model, tiny_ids):
    model = tiny_model(family)
    source_cls = type(model)
    x = tiny_ids(2, 11)
    before = model(x).logits
    config_before = model.config.to_dict()
    assert convert_to_hybrid(model, []) is model
    assert convert_to_hybrid(model, "none") is model
    assert torch.equal(model(x).logits, before)
    assert type(model) is source_cls
    assert model.config.to_dict() == config_before
    assert hybrid_record(model.config) is None


@all_families
@pytest.mark.parametrize("kind, cls", [("gla", GatedLinearAttention), ("linear", LinearAttention)])
def test_some_layers_take_the_pretrained_weights(family, kind, cls, tiny_model, tiny_ids):
    model = tiny_model(family)
    source = copy.deepcopy(model)
    convert_to_hybrid(model, [0, 2], kind=kind)
    for i, layer in enumerate(model.model.layers):
        attn, old = layer.self_attn, source.model.layers[i].self_attn
        if i in (0, 2):
            assert isinstance(attn, cls)
            # every source tensor is copied one to one (q/k/v/o, and q_norm/k_norm for Qwen3)
            for name, tensor in old.state_dict().items():
                assert torch.equal(attn.state_dict()[name], tensor), name
        else:
            assert attn is not None and type(attn) is type(old)
            assert all(
                torch.equal(a, b) for a, b in zip(attn.state_dict().values(), old.state_dict().values())
            )
    record = hybrid_record(model.config)
    assert record == {"linear_layers": [0, 2], "kind": kind, "options": {}, "swaa_version": swaa.__version__}
    assert model.config.model_type == f"swaa_{family}"
    assert type(model).__name__ == f"Swaa{type(source).__name__}"
    assert isinstance(model, type(source))
    assert model(tiny_ids(2, 11)).logits.isfinite().all()


def test_qwen3_layer_types_keep_its_forward_working(tiny_model, tiny_ids):
    # Qwen3's forward looks up masks by config.layer_types: "linear_attention" there would raise KeyError
    model = tiny_model("qwen3")
    convert_to_hybrid(model, "all")
    assert set(model.config.layer_types) <= {"full_attention", "sliding_attention"}
    out = model(tiny_ids(2, 11), use_cache=True)
    assert out.logits.isfinite().all()


@families
def test_all_layers_converted_model_still_generates(family, tiny_model, tiny_ids):
    model = tiny_model(family)
    convert_to_hybrid(model, "all")
    assert all(isinstance(layer.self_attn, GatedLinearAttention) for layer in model.model.layers)
    x = tiny_ids(1, 6)
    out = model.generate(x, max_new_tokens=5, do_sample=False, min_new_tokens=5)
    assert out.shape == (1, 11)


def test_layer_options_reach_the_layers_and_the_record(tiny_model):
    model = tiny_model("qwen3")
    convert_to_hybrid(model, [1], kind="gla", gate="from_keys", output_norm=False)
    attn = model.model.layers[1].self_attn
    assert attn.gate == "from_keys" and attn.output_norm is False
    assert not hasattr(attn, "gk_proj")
    assert hybrid_record(model.config)["options"] == {"gate": "from_keys", "output_norm": False}


def test_converting_more_layers_later_extends_the_record(tiny_model):
    model = tiny_model("llama")
    convert_to_hybrid(model, [3])
    convert_to_hybrid(model, [0])
    assert hybrid_record(model.config)["linear_layers"] == [0, 3]
    with pytest.raises(ValueError, match=r"layers \[3\] are already converted"):
        convert_to_hybrid(model, [3])
    with pytest.raises(ValueError, match="kind='gla'"):
        convert_to_hybrid(model, [1], kind="linear")


@pytest.mark.parametrize(
    "call, error, words",
    [
        (lambda m: convert_to_hybrid(m, [0, 99]), IndexError, "layer 99 is out of range"),
        (lambda m: convert_to_hybrid(m, [0], kind="mamba"), ValueError, "kind must be one of"),
        (lambda m: convert_to_hybrid(m, [0, 1], no_such_option=3), TypeError, "no_such_option"),
        (lambda m: convert_to_hybrid(m, [0], gate=object()), TypeError, "JSON"),
        (lambda m: convert_to_hybrid(m, [0], gate="sideways"), ValueError, "gate must be one of"),
    ],
)
def test_refused_conversion_leaves_the_model_as_it_was(call, error, words, tiny_model, tiny_ids):
    model = tiny_model("qwen3")
    x = tiny_ids(2, 11)
    before = model(x).logits
    modules_before = [layer.self_attn for layer in model.model.layers]
    with pytest.raises(error, match=words):
        call(model)
    assert [layer.self_attn for layer in model.model.layers] == modules_before
    assert type(model) is Qwen3ForCausalLM and type(model.config) is Qwen3Config
    assert hybrid_record(model.config) is None
    assert torch.equal(model(x).logits, before)


def test_unsupported_model_names_the_supported_families(tiny_model):
    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(GPT2Config(n_embd=16, n_layer=2, n_head=2, vocab_size=50))
    with pytest.raises(ValueError, match=r"'gpt2' cannot be converted.*qwen3.*qwen2.*llama.*mistral"):
        convert_to_hybrid(gpt2, [0])
    with pytest.raises(TypeError, match="Qwen3ForCausalLM"):
        convert_to_hybrid(tiny_model("qwen3").model, [0])
    with pytest.raises(TypeError, match="causal LM"):
        convert_to_hybrid(torch.nn.Linear(2, 2), [0])


# save / load


@all_families
@pytest.mark.parametrize(
    "kind, options", [("gla", {}), ("gla", {"gate": "from_keys"}), ("linear", {"feature_map": "elu"})]
)
def test_save_load_round_trip_gives_identical_logits(tmp_path, family, kind, options, tiny_model, tiny_ids):
    model = tiny_model(family)
    convert_to_hybrid(model, "every:2", kind=kind, **options)
    x = tiny_ids(2, 11)
    expected = model(x).logits
    model.save_pretrained(tmp_path)

    files = sorted(os.listdir(tmp_path))
    assert "model.safetensors" in files
    assert not any(f.endswith((".bin", ".pt", ".pkl", ".py")) for f in files)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model_type"] == f"swaa_{family}"
    assert saved["swaa_hybrid"]["linear_layers"] == [0, 2]

    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(loaded) is type(model)
    assert hybrid_record(loaded.config) == hybrid_record(model.config)
    assert [type(layer.self_attn) for layer in loaded.model.layers] == [
        type(layer.self_attn) for layer in model.model.layers
    ]
    assert torch.equal(loaded(x).logits, expected)


def test_saved_hybrid_can_be_converted_further_after_loading(tmp_path, tiny_model):
    model = tiny_model("qwen3")
    convert_to_hybrid(model, [0])
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    convert_to_hybrid(loaded, [3])
    assert hybrid_record(loaded.config)["linear_layers"] == [0, 3]
    assert isinstance(loaded.model.layers[3].self_attn, GatedLinearAttention)


# generate


@pytest.fixture
def hybrid(tiny_model):
    """A tiny model of `family` with layers `spec` converted to GLA."""

    def build(family, dtype=torch.float32, spec="0,2"):
        model = tiny_model(family, dtype=dtype)
        convert_to_hybrid(model, spec)
        return model

    return build


@families
@pytest.mark.parametrize("num_beams", [1, 3])
def test_generate_same_tokens_with_and_without_cache(family, num_beams, tiny_ids, hybrid):
    model = hybrid(family, torch.float64)
    x = tiny_ids(1, 7)
    kwargs = dict(max_new_tokens=8, min_new_tokens=8, do_sample=False, num_beams=num_beams)
    with_cache = model.generate(x, use_cache=True, **kwargs)
    without = model.generate(x, use_cache=False, **kwargs)
    assert torch.equal(with_cache, without)


@families
def test_left_padded_batch_equals_single_prompts(family, tiny_ids, hybrid):
    model = hybrid(family, torch.float64)
    prompts = [tiny_ids(1, 9, seed=3)[0], tiny_ids(1, 5, seed=4)[0], tiny_ids(1, 2, seed=5)[0]]
    width = max(len(p) for p in prompts)
    batch = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros(len(prompts), width, dtype=torch.long)
    for row, p in enumerate(prompts):
        batch[row, width - len(p) :] = p
        mask[row, width - len(p) :] = 1
    kwargs = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0)
    together = model.generate(batch, attention_mask=mask, **kwargs)[:, width:]
    for row, p in enumerate(prompts):
        alone = model.generate(p[None], attention_mask=torch.ones(1, len(p), dtype=torch.long), **kwargs)
        assert torch.equal(together[row], alone[0, len(p) :]), f"prompt {row}"


def test_sampling_with_a_seed_is_reproducible(tiny_ids, hybrid):
    model = hybrid("qwen3")
    x = tiny_ids(2, 5)
    runs = []
    for _ in range(2):
        torch.manual_seed(7)
        runs.append(model.generate(x, max_new_tokens=10, do_sample=True, top_k=20, temperature=1.0))
    assert torch.equal(*runs)


def test_long_generation_keeps_kv_for_softmax_layers_and_a_fixed_state_for_linear_ones(tiny_model, tiny_ids):
    # layer 0 linear: the cache must still report the right length (positions of the softmax layer)
    model = tiny_model("qwen3", num_hidden_layers=2)
    convert_to_hybrid(model, [0])
    x = tiny_ids(1, 4)
    new = 1100
    out = model.generate(
        x, max_new_tokens=new, min_new_tokens=new, do_sample=False, return_dict_in_generate=True
    )
    assert out.sequences.shape == (1, 4 + new)
    cache = getattr(out, "past_key_values", None) or out.cache
    assert isinstance(cache, DynamicCache)
    # the last generated token is never fed back, so the cache has seen all tokens but one
    seen = 4 + new - 1
    assert cache.get_seq_length() == seen
    assert cache.layers[1].keys.shape[-2] == seen
    assert cache.layers[0].keys is None or cache.layers[0].keys.numel() == 0
    state = cache.get_recurrent_state(0)
    # [B, H, K, V]: no dimension grows with the number of tokens
    assert state is not None and max(state.shape) <= 8


# what transformers' own model tests expect of a model class (issue 11 item 7)


def test_a_hybrid_built_from_its_config_initialises_every_layer_as_documented(tiny_model):
    model = convert_to_hybrid(tiny_model("llama", initializer_range=0.5, hidden_size=64, head_dim=16), [1])
    torch.manual_seed(0)
    fresh = AutoModelForCausalLM.from_config(model.config)
    new, stock = fresh.model.layers[1].self_attn, fresh.model.layers[0].self_attn
    # the converted layer's projections get initializer_range like every stock projection (not torch's default)
    for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
        std = getattr(new, name).weight.std().item()
        assert abs(std - 0.5) < 0.1 and abs(std - getattr(stock, name).weight.std().item()) < 0.1, name
    # the added parameters keep their documented init: the gate bias gives 10..1000-token memories (not 0)
    documented = GatedLinearAttention(model.config, 1)
    assert torch.equal(new.gk_proj[1].bias, documented.gk_proj[1].bias)
    assert new.gk_proj[1].bias.abs().min() > 0
    assert torch.equal(new.o_norm.weight, torch.ones_like(new.o_norm.weight))


def test_init_weights_knows_the_added_parameters_and_spares_loaded_ones(tiny_model):
    model = convert_to_hybrid(tiny_model("qwen3"), [2])
    layer = model.model.layers[2].self_attn
    documented = layer.gk_proj[1].bias.detach().clone()
    with torch.no_grad():
        layer.gk_proj[1].bias.zero_()
        layer.o_norm.weight.fill_(3.0)
    layer.o_norm.weight._is_hf_initialized = True  # as transformers marks a loaded tensor
    model._init_weights(layer)
    assert torch.equal(layer.gk_proj[1].bias, documented)
    assert torch.equal(layer.o_norm.weight, torch.full_like(layer.o_norm.weight, 3.0))


@pytest.mark.parametrize("family", ["qwen3", "llama"])
def test_every_auto_class_of_the_family_knows_the_hybrid_config(family, tmp_path, tiny_model, tiny_ids):
    import transformers
    from transformers.models.auto import modeling_auto

    model = convert_to_hybrid(tiny_model(family), [0, 2])
    model.save_pretrained(tmp_path)
    heads = [
        getattr(transformers, name)
        for name in ("AutoModel", "AutoModelForSequenceClassification", "AutoModelForTokenClassification")
    ]
    heads += [
        cls
        for cls in vars(modeling_auto).values()
        if isinstance(cls, type)
        and family in getattr(getattr(cls, "_model_mapping", None), "_model_mapping", {})
        and cls not in heads
    ]
    for auto in heads:
        built = auto.from_config(model.config)
        assert type(built).__name__.startswith("Swaa"), auto.__name__
        kinds = [type(layer.self_attn).__name__ for layer in built.base_model.layers]
        assert kinds[0] == kinds[2] == "GatedLinearAttention" and "Attention" in kinds[1], auto.__name__
    # the bare model loads from the causal LM's checkpoint and computes the same hidden states
    base = transformers.AutoModel.from_pretrained(tmp_path).eval()
    x = tiny_ids(1, 7)
    with torch.no_grad():
        expected = model.model(x).last_hidden_state
        assert torch.equal(base(x).last_hidden_state, expected)


def test_output_attentions_has_one_entry_per_layer_none_where_converted(tiny_model, tiny_ids):
    model = convert_to_hybrid(tiny_model("qwen3", attn_implementation="eager"), [1, 2])
    x = tiny_ids(2, 5)
    with torch.no_grad():
        attentions = model(x, output_attentions=True).attentions
        as_tuple = model(x, output_attentions=True, return_dict=False)
    assert len(attentions) == model.config.num_hidden_layers
    assert attentions[1] is None and attentions[2] is None
    assert attentions[0].shape == attentions[3].shape == (2, 4, 5, 5)
    assert any(isinstance(t, tuple) and len(t) == 4 and t[1] is None for t in as_tuple)
    out = model.generate(
        x, max_new_tokens=2, do_sample=False, output_attentions=True, return_dict_in_generate=True
    )
    assert all(len(step) == 4 and step[1] is None for step in out.attentions)


def test_save_pretrained_refuses_a_layer_swapped_in_by_hand_and_writes_nothing(tmp_path, tiny_model):
    model = tiny_model("llama")
    model.model.layers[1].self_attn = GatedLinearAttention(model.config, 1)
    with pytest.raises(
        ValueError,
        match=r"model\.layers\.1\.self_attn \(GatedLinearAttention\).*convert_to_hybrid\(model, \[1\], kind='gla'\)",
    ):
        model.save_pretrained(tmp_path / "hand")
    assert not (tmp_path / "hand").exists()
    # a converted hybrid with one more layer placed by hand, or one of another kind, is refused too
    hybrid = convert_to_hybrid(tiny_model("llama"), [0])
    hybrid.model.layers[2].self_attn = LinearAttention(hybrid.config, 2)
    with pytest.raises(ValueError, match=r"layers\.2\.self_attn \(LinearAttention\)"):
        hybrid.save_pretrained(tmp_path / "mixed")
    assert not (tmp_path / "mixed").exists()
    # what the message says to do saves, and reloads as the same hybrid
    converted = convert_to_hybrid(tiny_model("llama"), [1], kind="gla")
    converted.save_pretrained(tmp_path / "ok")
    assert isinstance(
        AutoModelForCausalLM.from_pretrained(tmp_path / "ok").model.layers[1].self_attn, GatedLinearAttention
    )
