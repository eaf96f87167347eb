"""The streamed engine's first layer (core/model/stream.py): a model whose blocks are read from the checkpoint when
they run gives the in-memory model's outputs bit for bit, with one block's weights resident at a time."""
from __future__ import annotations

import pytest
import torch

from core.model.stream import StreamError, WeightStore, streamed

KINDS = ("llama", "qwen2", "gpt2", "opt", "bert")


def _outputs(model, ids):
    with torch.no_grad():
        out = model(input_ids=ids)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


@pytest.mark.parametrize("kind", KINDS)
def test_streamed_forward_is_bit_identical_and_holds_one_block(kind, tiny_dir):
    from transformers import AutoModel, AutoModelForCausalLM

    folder = tiny_dir(kind)
    cls = AutoModel if kind == "bert" else AutoModelForCausalLM
    ref_model = cls.from_pretrained(folder, dtype=torch.float32).eval()
    model, s = streamed(folder)
    ids = torch.randint(0, 100, (2, 17))
    ref, got = _outputs(ref_model, ids), _outputs(model, ids)
    assert torch.equal(ref, got)
    assert s.peak_resident_blocks == 1 and s.resident_blocks == 0
    assert all(p.is_meta for p in s.blocks.parameters())  # released after the pass
    # an override replaces the checkpoint's tensor when its block runs
    name = next(n for n, _ in ref_model.named_parameters() if n.startswith(s.prefix + ".0.") and n.endswith("weight")
                and _.dim() == 2)
    s.overrides[name] = torch.zeros_like(dict(ref_model.named_parameters())[name])
    with torch.no_grad():
        dict(ref_model.named_parameters())[name].zero_()
    assert torch.equal(_outputs(ref_model, ids), _outputs(model, ids))


def test_damaged_checkpoint_is_one_sentence(tiny_dir, tmp_path):
    import shutil

    folder = tmp_path / "m"
    shutil.copytree(tiny_dir("llama"), folder)
    f = next(folder.glob("*.safetensors"))
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])  # cut mid-way through the tensors: the header promises more
    with pytest.raises(StreamError) as e:
        streamed(folder)
    assert "safetensors" in str(e.value) and "\n" not in str(e.value)
