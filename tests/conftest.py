"""Test-session settings and the fixtures every room of tests/ shares.

Fixtures (tests reach them by name; no test module imports another, and under --import-mode=importlib
none can):
- ``tiny_config(family="qwen3", **overrides)`` / ``tiny_model(family="qwen3", dtype=torch.float32, seed=0,
  **overrides)``: a random tiny Qwen3, Llama, Qwen2 or Mistral built from ``TINY`` (nothing downloaded);
  a test that needs other sizes passes them as overrides. ``tiny_ids(*shape, seed=1, low=3)``: token ids
  below TINY's vocabulary size (ids under 3 are the pad/eos/bos tokens).
- ``hacked``: the cache patch applied for one test and left as the test found it.

Autotuning on GPU machines:
SWAA_GPU_TEST_FIRST_CONFIG=1 (set by `benchmarks/gpu_session.sh tests:...`, never by CI): Triton's
autotuner stops at the first config that compiles and runs, instead of compiling and timing every one
(`swaa.kernels.autotune`).

Why: FLA autotunes each kernel per shape; on a fresh GPU machine its GLA backward alone spends minutes
compiling dozens of configs, and the GPU test file (five shapes, two dtypes, forward and backward) did
not finish in ten minutes. Every config of an autotuned kernel computes the same result, only at a
different speed, so the correctness tests lose nothing. The speed of the kernels is measured by the
benchmark scripts, which never set this. The tests step also turns off the on-disk autotune cache
(FLA_CACHE_RESULTS=0, TRITON_CACHE_AUTOTUNING=0), so this choice is never remembered as a winner.
"""

import os

import pytest
import torch

# the one tiny shape: 4 layers of 4 query / 2 key-value heads of 8 dims (GQA), a 97-token vocabulary
TINY = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    vocab_size=97,
    max_position_embeddings=4096,
    pad_token_id=0,
    eos_token_id=1,
    bos_token_id=2,
)
# transformers' config and causal-LM class of each family, by name (looked up when a test builds one)
TINY_FAMILIES = {
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM"),
    "llama": ("LlamaConfig", "LlamaForCausalLM"),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
    "mistral": ("MistralConfig", "MistralForCausalLM"),
}


def _classes(family):
    import transformers

    config_name, model_name = TINY_FAMILIES[family]
    return getattr(transformers, config_name), getattr(transformers, model_name)


def build_tiny_config(family="qwen3", **overrides):
    """The config of a tiny ``family`` model: ``TINY`` with ``overrides`` on top."""
    return _classes(family)[0](**{**TINY, **overrides})


def build_tiny_model(family="qwen3", dtype=torch.float32, seed=0, **overrides):
    """A random tiny causal LM of ``family`` in eval mode, its weights drawn after ``torch.manual_seed(seed)``."""
    config = build_tiny_config(family, **overrides)
    torch.manual_seed(seed)
    return _classes(family)[1](config).to(dtype).eval()


def build_tiny_ids(*shape, seed=1, low=3):
    """Token ids of ``shape`` in ``[low, TINY vocab)``, from their own generator (the global seed is untouched)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(low, TINY["vocab_size"], shape, generator=generator)


def host_softmax_tolerance(attn: str) -> dict:
    """``assert_close`` tolerances for what follows a softmax layer of a float64 model run with ``attn``:
    transformers' eager attention takes its softmax in float32 even for float64 inputs, and a left-padded
    row sums in another order than the same row alone (how the CPU's vector lanes split it: it differs
    between machines), so it carries float32 noise there; SDPA stays in float64. A padding leak is O(0.1)."""
    return dict(rtol=1e-9, atol=1e-9) if attn == "sdpa" else dict(rtol=1e-6, atol=1e-6)


# session scope: they hand out functions, so module-scoped fixtures (a saved checkpoint) can use them too
@pytest.fixture(scope="session")
def tiny_config():
    return build_tiny_config


@pytest.fixture(scope="session")
def tiny_model():
    return build_tiny_model


@pytest.fixture(scope="session")
def tiny_ids():
    return build_tiny_ids


@pytest.fixture(scope="session")
def softmax_tolerance():
    return host_softmax_tolerance


@pytest.fixture
def hacked():
    """The cache patch in place during the test; afterwards on or off again as the test found it (swaa
    layers apply the patch themselves, so other tests may find it either way). A module that needs it for
    every test says ``pytestmark = pytest.mark.usefixtures("hacked")``."""
    from swaa.cache import hack_kv_cache_recurrent_state, is_hacked, unhack_kv_cache_recurrent_state

    was = is_hacked()
    hack_kv_cache_recurrent_state()
    yield
    if was and not is_hacked():
        hack_kv_cache_recurrent_state()
    elif not was and is_hacked():
        unhack_kv_cache_recurrent_state()


def pytest_configure(config):
    if os.environ.get("SWAA_GPU_TEST_FIRST_CONFIG") == "1":
        from swaa.kernels.autotune import stop_autotuning_at_first_working_config

        stop_autotuning_at_first_working_config()
