"""The import arrows users rely on, each checked in a fresh interpreter: the kernels load no
transformers, the cache patch loads no other swaa part, the CLI starts without torch, and a saved hybrid
loads through the Auto classes after ``import swaa`` whichever of the two is imported first."""

import json
import subprocess
import sys

import pytest


def modules_after(code: str) -> set[str]:
    """The modules loaded in a fresh interpreter after running ``code``."""
    out = subprocess.run(
        [sys.executable, "-c", f"{code}\nimport json, sys; print(json.dumps(sorted(sys.modules)))"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return set(json.loads(out.strip().splitlines()[-1]))


def test_kernels_load_no_transformers_and_no_other_swaa_room():
    loaded = modules_after("import swaa.kernels")
    assert not {m for m in loaded if m.split(".")[0] == "transformers"}
    assert not {m for m in loaded if m.startswith(("swaa.layers", "swaa.convert", "swaa.app", "swaa.cache"))}


def test_the_cache_patch_loads_no_torch_side_swaa_room():
    loaded = modules_after("import swaa.cache")
    assert not {
        m for m in loaded if m.startswith(("swaa.layers", "swaa.convert", "swaa.app", "swaa.kernels"))
    }


def test_the_cli_parser_loads_no_torch():
    loaded = modules_after("from swaa.app.cli import _parser; _parser()")
    assert "torch" not in loaded and "transformers" not in loaded


@pytest.mark.parametrize(
    "statement",
    [
        "from transformers import LlamaForCausalLM",
        "from transformers.models.llama.modeling_llama import LlamaAttention",
    ],
)
def test_a_transformers_model_module_imports_after_import_swaa(statement):
    modules_after(f"import swaa\n{statement}")


def test_the_package_root_re_exports_lazily():
    loaded = modules_after("import swaa; swaa.__version__")
    assert "torch" not in loaded
    code = "import swaa; print(swaa.convert_to_hybrid.__module__, swaa.GatedLinearAttention.__module__)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["swaa.convert.hybrid", "swaa.layers.gated_linear_attention"]
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        import swaa

        swaa.nothing  # noqa: B018


@pytest.mark.parametrize("order", ["swaa first", "transformers first"])
def test_a_saved_hybrid_loads_after_import_swaa_in_a_fresh_interpreter(tmp_path, order, tiny_model):
    from swaa.convert import convert_to_hybrid

    model = convert_to_hybrid(tiny_model("qwen3", num_hidden_layers=2), [0])
    model.save_pretrained(tmp_path)
    imports = (
        "import swaa\nfrom transformers import AutoModelForCausalLM"
        if order == "swaa first"
        else "from transformers import AutoModelForCausalLM\nimport swaa"
    )
    code = (
        f"{imports}\nm = AutoModelForCausalLM.from_pretrained({str(tmp_path)!r})\n"
        "print(type(m).__name__, type(m.model.layers[0].self_attn).__name__, m.config.swaa_hybrid['linear_layers'])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split()[:2] == ["SwaaQwen3ForCausalLM", "GatedLinearAttention"]
    assert json.loads(" ".join(out.split()[2:])) == [0]
