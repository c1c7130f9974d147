"""What `swaa info` and the demo call each layer: its conversion kind, whichever kind converted it."""

from swaa.app.evaluate import attention_types
from swaa.convert import KINDS, convert_to_hybrid


def test_each_converted_layer_reads_as_its_kind(tiny_model):
    for kind in KINDS:
        model = convert_to_hybrid(tiny_model(), [0, 2], kind=kind)
        assert attention_types(model) == [kind, "softmax", kind, "softmax"]
