"""torch.export of converted hybrids with static shapes (issue 10): the exported program, one token per
call, gives the logits of the eager model's full forward, and a second sequence through the same
program starts from a fresh state."""

import pytest
import torch

from swaa.convert import convert_to_hybrid
from swaa.convert.export import export_decoder


@pytest.mark.parametrize(
    "kind, options",
    [
        ("gla", {}),
        ("linear", {}),
        ("linear", {"feature_map": "elu", "normalize": False}),
        ("swa_gla", {"window": 3}),
    ],
)
@pytest.mark.parametrize("family", ["qwen3", "llama"])
def test_an_exported_hybrid_steps_like_the_eager_model(tiny_model, tiny_ids, kind, options, family):
    model = convert_to_hybrid(tiny_model(family), [0, 1, 3], kind=kind, **options)
    step = export_decoder(model, max_cache_len=16).module()
    for seed in (1, 2):  # two sequences through one program: position 0 starts afresh
        ids = tiny_ids(1, 7, seed=seed)
        with torch.no_grad():
            want = model(ids).logits[0]
        got = torch.stack(
            [step(input_ids=ids[:, t : t + 1], cache_position=torch.tensor([t]))[0, -1] for t in range(7)]
        )
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_export_arguments_are_checked_first(tiny_model):
    model = convert_to_hybrid(tiny_model(), [0])
    with pytest.raises(ValueError, match="max_cache_len"):
        export_decoder(model, max_cache_len=0)
    with pytest.raises(TypeError, match="batch_size"):
        export_decoder(model, batch_size=1.5, max_cache_len=8)
