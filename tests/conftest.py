"""Shared fixtures: tiny random-weight models built from configs (no download), saved as real folders."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch.set_num_threads(min(2, torch.get_num_threads()))

from core.model.models import minilm_path  # noqa: E402

VOCAB = 30522  # the bundled BERT (MiniLM) tokenizer's vocabulary, so tiny models can share it


def tiny_config(kind: str):
    import transformers as tf

    common = dict(vocab_size=VOCAB)
    if kind == "qwen2":
        return tf.Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                              num_key_value_heads=2, max_position_embeddings=256, architectures=["Qwen2ForCausalLM"],
                              tie_word_embeddings=True, **common)
    if kind == "llama":
        return tf.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                              num_key_value_heads=4, max_position_embeddings=256, architectures=["LlamaForCausalLM"],
                              tie_word_embeddings=True, **common)
    if kind == "mistral":
        return tf.MistralConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                num_key_value_heads=2, max_position_embeddings=256, architectures=["MistralForCausalLM"],
                                sliding_window=None, **common)
    if kind == "gpt2":
        return tf.GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=256, architectures=["GPT2LMHeadModel"], **common)
    if kind == "opt":
        return tf.OPTConfig(hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
                            max_position_embeddings=256, word_embed_proj_dim=64, architectures=["OPTForCausalLM"],
                            **common)
    if kind == "bert":
        return tf.BertConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                             max_position_embeddings=256, architectures=["BertModel"], **common)
    raise ValueError(kind)


def build_tiny(kind: str, seed: int = 0) -> torch.nn.Module:
    import transformers as tf

    torch.manual_seed(seed)
    cfg = tiny_config(kind)
    cls = tf.BertModel if kind == "bert" else tf.AutoModelForCausalLM
    model = cls(cfg) if kind == "bert" else cls.from_config(cfg)
    return model.eval()


@pytest.fixture(scope="session")
def tokenizer_dir() -> str:
    return str(minilm_path())


@pytest.fixture(scope="session")
def llm_cache(tmp_path_factory) -> Path:
    """The session's one cache folder for the bundled SmolLM2: its GGUF is converted into it once per run
    (~30-60 s on 2 cores). It is the app tests' shared cache too (``app_harness.shared_cache``)."""
    path = tmp_path_factory.getbasetemp() / "app-cache"
    path.mkdir(exist_ok=True)
    return path


@pytest.fixture(scope="session")
def smollm2_folder(llm_cache) -> Path:
    """The converted (safetensors) folder of the bundled SmolLM2 GGUF inside ``llm_cache``."""
    from core.model.models import resolve_source

    return Path(resolve_source("smollm2", cache_dir=llm_cache).path)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """``tiny_dir(kind)`` -> a saved folder with a tiny random model of that architecture (cached per session)."""
    made: dict[str, str] = {}

    def make(kind: str) -> str:
        if kind not in made:
            d = tmp_path_factory.mktemp(f"tiny-{kind}")
            build_tiny(kind).save_pretrained(d)
            made[kind] = str(d)
        return made[kind]
    return make


def tiny_settings(model_dir: str, tokenizer_dir: str, **kw):
    from core.analysis import AnalysisSettings
    from core.model.calibration import CalibrationSpec
    from core.studies.sweep import SweepSettings

    cal = kw.pop("calibration", CalibrationSpec(n_samples=4, seqlen=64, heldout_samples=2))
    sweep = kw.pop("sweep", SweepSettings(bits=(3, 4), group_size=32, n_grid=10))
    return AnalysisSettings(model=model_dir, tokenizer=tokenizer_dir, calibration=cal, sweep=sweep,
                            sample_rows=128, heldout_rows=64, **kw)
