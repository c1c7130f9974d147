"""attention_transfer on CUDA: the converted layers train through FLA's kernels (forward and backward)
while the recordings wait in host memory. Marked `gpu`; skipped without CUDA and FLA."""

import copy

import pytest
import torch

from swaa.convert import attention_transfer, convert_to_hybrid
from swaa.kernels import fla_available

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
    pytest.mark.skipif(torch.cuda.is_available() and not fla_available(), reason="needs fla-core"),
]


def test_transfer_on_cuda_with_recordings_in_host_memory(tiny_model, tiny_ids):
    teacher = tiny_model("qwen3", hidden_size=128, head_dim=32).cuda()
    student = convert_to_hybrid(copy.deepcopy(teacher), [1, 3])
    text = tiny_ids(512)
    report = attention_transfer(
        teacher, student, text, window=128, steps=30, batch_size=2, record_device="cpu", progress=False
    )
    for i, e in report["layers"].items():
        assert e["after"] < e["before"], (i, e)
    assert all(p.is_cuda for p in student.parameters())
