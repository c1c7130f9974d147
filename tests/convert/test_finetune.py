"""A hybrid fine-tunes with transformers' own Trainer and packed batches (DataCollatorWithFlattening),
the recipe the README gives after attention transfer. Needs accelerate (the demo extras)."""

import copy

import pytest
import torch
from transformers import DataCollatorWithFlattening

from swaa.convert import convert_to_hybrid

pytest.importorskip("accelerate", reason="Trainer needs accelerate (pip install 'swaa[demo]')")


def sequences(vocab_size, count=8, seed=3):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(5, 40, (count,), generator=g).tolist()
    return [{"input_ids": torch.randint(3, vocab_size, (n,), generator=g).tolist()} for n in lengths]


def test_packed_loss_equals_the_loss_of_each_sequence_alone(tiny_model):
    model = convert_to_hybrid(tiny_model("qwen3"), [0, 2])
    data = sequences(model.config.vocab_size, 3)
    batch = DataCollatorWithFlattening()(data)
    with torch.no_grad():
        # use_cache=False, as for training: transformers reads packing from position_ids only without a cache
        packed = model(**{k: torch.as_tensor(v) for k, v in batch.items()}, use_cache=False).loss
        total, count = 0.0, 0
        for row in data:
            ids = torch.tensor([row["input_ids"]])
            total += model(ids, labels=ids).loss * (ids.shape[1] - 1)
            count += ids.shape[1] - 1
    torch.testing.assert_close(packed, total / count, rtol=1e-5, atol=1e-6)


def test_trainer_fine_tunes_only_the_converted_layers(tmp_path, tiny_model):
    from transformers import Trainer, TrainingArguments

    model = convert_to_hybrid(tiny_model("qwen3").train(), [1, 3])
    model.config.use_cache = False  # training: no cache, so packed sequences are read from position_ids
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith(("model.layers.1.self_attn.", "model.layers.3.self_attn.")))
    before = copy.deepcopy(model.state_dict())
    args = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=4,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        report_to=[],
        save_strategy="no",
        logging_strategy="no",
        use_cpu=True,
    )
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=sequences(model.config.vocab_size, 16),
        data_collator=DataCollatorWithFlattening(),
    )
    trainer.train()
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(
        k.startswith(("model.layers.1.self_attn.", "model.layers.3.self_attn.")) for k in changed
    )
    model.save_pretrained(tmp_path / "tuned")
    assert (tmp_path / "tuned" / "model.safetensors").is_file()
