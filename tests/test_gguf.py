"""GGUF sources (a tiny GGUF written here, and the bundled SmolLM2), model names, and the group-size rule."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import ROOT, tiny_settings

from core.model import gguf_file
from core.analysis import AnalysisSettings, analyze, cache_key, model_identity
from core.model.calibration import CalibrationSpec
from core.model.models import (BUNDLED_MODELS, MINILM_ID, SMOLLM2_ID, ModelLoadError, canonical_model, layer_widths, load_model)
from core.grids.quant import check_model_group_size, default_group_size, model_group_sizes
from core.studies.sweep import SweepSettings

N_HEAD, N_KV = 4, 2


# --- a tiny GGUF, written with the gguf package's own writer --------------------------------------------

def _tiny_llama():
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=N_HEAD,
                         num_key_value_heads=N_KV, max_position_embeddings=256, vocab_size=261,
                         tie_word_embeddings=False, rms_norm_eps=1e-5, rope_theta=10000.0)
    return tf.LlamaForCausalLM(cfg).eval()


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's convert script reorders Q/K rows for its rotary layout; transformers undoes it on load."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


GGUF_NAMES = [("self_attn.q_proj", "attn_q"), ("self_attn.k_proj", "attn_k"), ("self_attn.v_proj", "attn_v"),
              ("self_attn.o_proj", "attn_output"), ("mlp.gate_proj", "ffn_gate"), ("mlp.up_proj", "ffn_up"),
              ("mlp.down_proj", "ffn_down"), ("input_layernorm", "attn_norm"), ("post_attention_layernorm", "ffn_norm")]
Q4_1_TENSOR = "blk.1.ffn_down.weight"  # stored as Q4_1 (a real llama.cpp quantization); the rest F32


def write_tiny_gguf(path: Path, model, arch: str = "llama") -> Path:
    """A real GGUF of ``model`` (tiny Llama): F32 tensors, one Q4_1 tensor, a byte-level BPE tokenizer."""
    import gguf
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    b2u = bytes_to_unicode()
    tokens = [b2u[i] for i in range(256)] + ["\u0120t", "<s>", "</s>", "<unk>", "<pad>"]
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name("tiny-llama")
    w.add_block_count(2)
    w.add_context_length(256)
    w.add_embedding_length(64)
    w.add_feed_forward_length(128)
    w.add_head_count(N_HEAD)
    w.add_head_count_kv(N_KV)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    w.add_rope_dimension_count(16)
    w.add_vocab_size(len(tokens))
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([1] * 257 + [3] * 4)
    w.add_token_merges(["\u0120 t"])
    w.add_bos_token_id(257)
    w.add_eos_token_id(258)
    w.add_unk_token_id(259)
    w.add_pad_token_id(260)
    sd = {k: v.numpy() for k, v in model.state_dict().items()}
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    for i in range(2):
        for hf, gg in GGUF_NAMES:
            names[f"model.layers.{i}.{hf}.weight"] = f"blk.{i}.{gg}.weight"
    for hf, gg in names.items():
        t = sd[hf].astype(np.float32)
        if gg.endswith("attn_q.weight"):
            t = _permute(t, N_HEAD)
        elif gg.endswith("attn_k.weight"):
            t = _permute(t, N_KV)
        if gg == Q4_1_TENSOR:
            w.add_tensor(gg, gguf.quants.quantize(t, gguf.GGMLQuantizationType.Q4_1),
                         raw_dtype=gguf.GGMLQuantizationType.Q4_1)
        else:
            w.add_tensor(gg, t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    model = _tiny_llama()
    path = write_tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny-llama.F32.gguf", model)
    return path, model


@pytest.fixture(scope="module")
def gguf_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("gguf-cache")


def test_tiny_gguf_types_and_name_mapping(tiny_gguf):
    path, _ = tiny_gguf
    arch, formats = gguf_file.read_header(path)
    assert arch == "llama"
    assert formats[Q4_1_TENSOR].type == "Q4_1" and formats[Q4_1_TENSOR].block == 32
    assert formats[Q4_1_TENSOR].describe() == "Q4_1, blocks of 32"
    assert formats["blk.0.attn_q.weight"].describe() == "F32 (not quantized)"
    assert formats["blk.0.ffn_down.weight"].shape == (128, 64)  # GGUF lists [in, out]
    mods = [f"model.layers.{i}.{hf}" for i in range(2) for hf, _ in GGUF_NAMES[:7]]
    mapping = gguf_file.module_to_tensor(mods, arch, 2)
    assert mapping["model.layers.0.self_attn.q_proj"] == "blk.0.attn_q.weight"
    assert mapping["model.layers.1.self_attn.o_proj"] == "blk.1.attn_output.weight"
    assert mapping["model.layers.1.mlp.down_proj"] == "blk.1.ffn_down.weight"
    assert set(mapping) == set(mods)
    assert sorted(set(gguf_file.linear_widths(formats))) == [64, 128]


def test_tiny_gguf_converts_once_with_the_same_weights_and_logits(tiny_gguf, gguf_cache):
    import gguf
    import transformers as tf

    path, orig = tiny_gguf
    seen: list[tuple[float, str]] = []
    lm = load_model(str(path), cache_dir=gguf_cache, progress=lambda f, m: seen.append((f, m)))
    assert seen and seen[-1][0] == 1.0 and any("convert" in m for _, m in seen)  # progress reported
    assert lm.model_id == str(path.resolve()) and lm.is_causal and lm.model_type == "llama"
    folder = gguf_file.converted_path(path, gguf_cache)
    manifest = gguf_file.read_manifest(folder)
    assert manifest is not None and (folder / "model.safetensors").is_file()
    assert not [p for p in folder.parent.iterdir() if p.name.endswith(".tmp")]  # no half-written folder left
    # Weights: F32 tensors exactly (Q/K un-permuted), the Q4_1 one exactly its dequantization.
    for name in ("model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.k_proj", "model.layers.0.mlp.up_proj"):
        assert torch.equal(lm.weight(name), orig.get_submodule(name).weight)
    reader = gguf.GGUFReader(str(path))
    raw = next(t for t in reader.tensors if t.name == Q4_1_TENSOR)
    deq = torch.from_numpy(gguf.quants.dequantize(raw.data, raw.tensor_type).reshape(64, 128).copy())
    assert torch.equal(lm.weight("model.layers.1.mlp.down_proj"), deq)
    assert not torch.equal(deq, orig.get_submodule("model.layers.1.mlp.down_proj").weight)
    # Formats per linear and the model-level note.
    assert lm.source_formats["model.layers.1.mlp.down_proj"] == "Q4_1, blocks of 32"
    assert lm.source_formats["model.layers.0.self_attn.q_proj"] == "F32 (not quantized)"
    assert len(lm.source_formats) == 14
    assert lm.source_note and "Q4_1" in lm.source_note and "group 32" in lm.source_note
    # Logits equal transformers' own GGUF-loaded model (and the converted copy is a plain, saveable model).
    ref = tf.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    ids = lm.tokenizer("the tiny test", return_tensors="pt")["input_ids"]
    assert ids.numel() > 3
    with torch.no_grad():
        assert torch.equal(lm.model(ids).logits, ref(ids).logits)
    assert getattr(lm.model.config, "quantization_config", None) is None
    # Reused afterwards: no conversion, same folder.
    stamp = (folder / "model.safetensors").stat().st_mtime_ns
    seen.clear()
    load_model(str(path), cache_dir=gguf_cache, progress=lambda f, m: seen.append((f, m)))
    assert seen == [] and (folder / "model.safetensors").stat().st_mtime_ns == stamp


def test_a_damaged_conversion_is_redone(tiny_gguf, tmp_path):
    path, _ = tiny_gguf
    folder = gguf_file.convert(path, tmp_path)
    meta = json.loads((folder / gguf_file.MANIFEST).read_text())
    weights = folder / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-5] ^= 0xFF  # same size, one flipped byte: the sha256 check catches it
    weights.write_bytes(bytes(data))
    assert gguf_file.read_manifest(folder) is None
    again = gguf_file.convert(path, tmp_path)
    assert again == folder and gguf_file.read_manifest(folder) is not None
    assert json.loads((folder / gguf_file.MANIFEST).read_text())["files"] == meta["files"]


def test_tiny_gguf_analyses_with_its_formats(tiny_gguf, gguf_cache, tokenizer_dir):
    path, _ = tiny_gguf
    settings = tiny_settings(str(path), tokenizer_dir, sweep=SweepSettings(bits=(3,), group_size=64, n_grid=5),
                             calibration=CalibrationSpec(n_samples=2, seqlen=64, heldout_samples=1))
    settings = AnalysisSettings(**{**settings.__dict__, "tokenizer": None})  # the GGUF's own tokenizer
    a = analyze(settings, gguf_cache)
    assert len(a.names) == 14 and set(a.layers["bits"]) == {3}
    assert a.source_format("model.layers.1.mlp.down_proj") == "Q4_1, blocks of 32"
    assert a.source_format("model.layers.0.mlp.down_proj") == "F32 (not quantized)"
    assert a.source_formats == {"F32 (not quantized)": 13, "Q4_1, blocks of 32": 1}
    assert a.source_note and "Q4_1" in a.source_note
    assert a.manifest["model_type"] == "llama" and a.default_group_size == 64
    # The cache key depends on the GGUF's bytes, not on the converted copy.
    mid, fp = model_identity(settings)
    assert mid == str(path.resolve()) and fp.startswith("gguf-")
    assert cache_key(settings, "t") == cache_key(settings, "t")


def test_cli_on_a_gguf_file_reports_its_formats(tiny_gguf, gguf_cache):
    path, _ = tiny_gguf
    r = subprocess.run([sys.executable, "-m", "core", "analyze", "--model", str(path), "--cache-dir", str(gguf_cache),
                        "--bits", "3", "--n-samples", "2", "--seqlen", "64", "--heldout-samples", "1",
                        "--sample-rows", "32", "--n-grid", "5", "--no-hessians"],
                       cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert "group 64 (model default 64)" in r.stdout  # --group-size auto, from the GGUF header's widths
    assert "source     F32 (not quantized): 13 linears; Q4_1, blocks of 32: 1 linears" in r.stdout
    assert "note       " in r.stdout and "Q4_1" in r.stdout


@pytest.mark.parametrize("case", ["not gguf", "truncated", "corrupt header", "unsupported", "missing", "folder"])
def test_bad_gguf_files_get_one_sentence(case, tiny_gguf, tmp_path):
    path, model = tiny_gguf
    bad = tmp_path / "bad.gguf"
    if case == "not gguf":
        bad.write_text("this is a text file, not a model\n")
        expect = "not a GGUF file"
    elif case == "truncated":
        bad.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
        expect = "truncated"
    elif case == "corrupt header":
        bad.write_bytes(b"GGUF" + bytes(range(256)) * 4)
        expect = "corrupt or truncated"
    elif case == "unsupported":
        write_tiny_gguf(bad, model, arch="no-such-arch")
        expect = "cannot load"
    elif case == "missing":
        bad = tmp_path / "nope.gguf"
        expect = "does not exist"
    else:
        bad.mkdir()
        expect = "is a folder, not a GGUF file"
    with pytest.raises(ModelLoadError) as e:
        load_model(str(bad), cache_dir=tmp_path / "cache")
    msg = str(e.value)
    assert expect in msg and "\n" not in msg and len(msg) < 300, msg
    models = tmp_path / "cache" / gguf_file.MODELS_DIR
    assert not models.exists() or not any(models.iterdir())  # nothing half-written left behind
    # The CLI: exit 2, one line on stderr, no traceback.
    r = subprocess.run([sys.executable, "-m", "core", "analyze", "--model", str(bad), "--cache-dir",
                        str(tmp_path / "cache"), "--group-size", "32", "--quiet"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and expect in lines[0], r.stderr


# --- names and defaults --------------------------------------------------------------------------------

def test_model_names_and_identity():
    assert canonical_model("bundled") == canonical_model(" SmolLM2 ") == "smollm2"
    assert canonical_model("MiniLM") == "minilm" and canonical_model("Qwen/Qwen2.5-0.5B") == "Qwen/Qwen2.5-0.5B"
    assert set(BUNDLED_MODELS) == {"smollm2", "minilm"}
    assert AnalysisSettings().model == "smollm2" and AnalysisSettings().sweep.group_size == 64
    mid, fp = model_identity(AnalysisSettings(model="bundled"))
    assert (mid, fp) == model_identity(AnalysisSettings())
    assert mid == SMOLLM2_ID and fp.startswith("smollm2-0.1.2-")
    assert cache_key(AnalysisSettings(model="bundled"), "x") == cache_key(AnalysisSettings(), "x")
    assert model_identity(AnalysisSettings(model="minilm"))[0] == MINILM_ID
    assert cache_key(AnalysisSettings(model="minilm"), "x") != cache_key(AnalysisSettings(), "x")


def test_cli_defaults_are_the_first_open_settings(tmp_path):
    from core.cli import build_parser
    from core.cli.common import settings_from_args

    args = build_parser().parse_args(["analyze", "--cache-dir", str(tmp_path)])
    assert args.group_size == "auto" and args.model == "smollm2"
    s = settings_from_args(args)
    d = AnalysisSettings()
    assert (s.model, s.calibration, s.sweep, s.sample_rows, s.heldout_rows) == (
        d.model, d.calibration, d.sweep, d.sample_rows, d.heldout_rows)
    minilm = settings_from_args(build_parser().parse_args(["analyze", "--model", "minilm"]))
    assert minilm.sweep.group_size == 128
    with pytest.raises(SystemExit):
        build_parser().parse_args(["analyze", "--group-size", "big"])


def test_layer_widths_without_loading(tiny_dir):
    assert sorted(set(layer_widths("smollm2"))) == [576, 1536]  # from the GGUF header: nothing converted
    assert sorted(set(layer_widths("minilm"))) == [384, 1536]
    assert sorted(set(layer_widths(tiny_dir("qwen2")))) == [64, 128]


# --- the group-size rule --------------------------------------------------------------------------------

def test_default_group_size():
    assert default_group_size([576, 1536]) == 64  # SmolLM2-135M
    assert default_group_size([384, 1536]) == 128  # MiniLM-L6
    assert default_group_size([896, 4864]) == 128  # Qwen2.5-0.5B
    assert default_group_size([96, 160]) == 32
    assert default_group_size([100, 200]) == 0  # none of 128/64/32 fits: one group per row
    assert default_group_size([]) == 0
    assert model_group_sizes([576, 1536]) == [16, 32, 64, 0]
    assert model_group_sizes([64, 128]) == [16, 32, 0]  # 64 is the whole row of the 64-wide layers


def test_check_model_group_size_message():
    assert check_model_group_size([576, 1536], 64) == 64
    assert check_model_group_size([576, 1536], 0) == 0 and check_model_group_size([576, 1536], -1) == 0
    with pytest.raises(ValueError) as e:
        check_model_group_size([576, 1536, 576], 128)
    msg = str(e.value)
    assert "group size 128 does not divide the input width 576" in msg
    assert "1536" in msg and "default group size is 64" in msg and "0 for one group per output row" in msg
    with pytest.raises(ValueError, match="none of 128, 64, 32"):
        check_model_group_size([100, 200], 64)
    with pytest.raises(ValueError, match="integer"):
        check_model_group_size([64], True)


@pytest.fixture(scope="module")
def tiny_llama_analysis(tiny_dir, tokenizer_dir, tmp_path_factory):
    s = tiny_settings(tiny_dir("llama"), tokenizer_dir, sweep=SweepSettings(bits=(3,), group_size=32, n_grid=5),
                      calibration=CalibrationSpec(n_samples=2, seqlen=64, heldout_samples=1))
    return analyze(s, tmp_path_factory.mktemp("rule-cache"))


def test_a_partially_dividing_group_size_is_refused_everywhere(tiny_llama_analysis, tiny_dir, tokenizer_dir, tmp_path):
    """Widths 64 and 128: group 128 fits only the down projections, so analyze, Layer Lab and evaluate refuse it
    with the same sentence."""
    from core.studies.evaluate import check_group_size, run_quality

    a = tiny_llama_analysis
    widths = [int(w) for w in a.linears["in_features"]]
    assert sorted(set(widths)) == [64, 128] and a.default_group_size == 64
    expect = "group size 128 does not divide the input width 64"
    s = tiny_settings(tiny_dir("llama"), tokenizer_dir, sweep=SweepSettings(bits=(3,), group_size=128, n_grid=5),
                      calibration=CalibrationSpec(n_samples=2, seqlen=64, heldout_samples=1))
    with pytest.raises(ValueError, match=expect):  # analyze
        analyze(s, tmp_path)
    assert not any(tmp_path.rglob("manifest.json"))
    down = next(n for n in a.names if n.endswith("down_proj"))
    assert int(a.info(down)["in_features"]) == 128
    with pytest.raises(ValueError, match=expect):  # the Layer Lab's engine call, even on a layer 128 divides
        a.evaluate_layer(down, alpha=0.5, bits=3, group_size=128)
    assert 128 not in model_group_sizes(widths)  # so the Lab's picker never offers it
    with pytest.raises(ValueError, match=expect):  # Model quality
        check_group_size(widths, 128)
    with pytest.raises(ValueError, match=expect):
        run_quality(a, modes=["fp", "rtn"], bits=[3], group_size=128)
    assert a.evaluate_layer(down, alpha=0.5, bits=3, group_size=32).group_size == 32
    assert a.evaluate_layer(down, alpha=0.5, bits=3, group_size=0).group_size == 128  # per row


# --- the bundled LLM ------------------------------------------------------------------------------------

def test_bundled_gguf_tensor_types_and_names():
    """The real file: 210 Q4_1 linears (30 blocks x q/k/v/o/gate/up/down), mapped onto Llama module names."""
    arch, formats = gguf_file.read_header(gguf_file.bundled_gguf())
    assert arch == "llama"
    mods = [f"model.layers.{i}.{p}" for i in range(30) for p in
            ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
             "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")]
    lin = gguf_file.linear_formats(formats, mods, arch, 30)
    assert set(lin) == set(mods)
    assert {f.describe() for f in lin.values()} == {"Q4_1, blocks of 32"}
    assert lin["model.layers.7.mlp.down_proj"].shape == (1536, 576)
    assert lin["model.layers.7.self_attn.k_proj"].shape == (576, 192)  # 3 KV heads of 64
    assert sum(f.type == "Q4_1" for f in formats.values()) == 210
    assert "float minimum" in gguf_file.format_note(lin.values())


def test_bundled_llm_converted_logits_equal_the_gguf_loaded_model(smollm2_folder):
    import transformers as tf

    path = gguf_file.bundled_gguf()
    conv = tf.AutoModelForCausalLM.from_pretrained(str(smollm2_folder), dtype=torch.float32).eval()
    ref = tf.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    tok = tf.AutoTokenizer.from_pretrained(str(smollm2_folder))
    ids = tok("The capital of France is", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.equal(conv(ids).logits, ref(ids).logits)
    manifest = gguf_file.read_manifest(smollm2_folder)
    assert manifest["architecture"] == "llama" and manifest["tensor_types"]["Q4_1"] == 210


def test_bundled_llm_analyses_end_to_end(smollm2_folder, llm_cache):
    settings = AnalysisSettings(calibration=CalibrationSpec(n_samples=1, seqlen=64, heldout_samples=1),
                                sweep=SweepSettings(bits=(3,), group_size=64, n_grid=5),
                                sample_rows=32, heldout_rows=32, hessians=False)  # ~100 MB less to write in CI
    a = analyze(settings, llm_cache)
    assert a.model_id == SMOLLM2_ID and a.manifest["is_causal"] and a.manifest["model_type"] == "llama"
    assert len(a.names) == 210 and set(a.layers["group_size"]) == {64}
    assert a.source_formats == {"Q4_1, blocks of 32": 210}
    assert a.source_format("model.layers.11.mlp.down_proj") == "Q4_1, blocks of 32"
    assert "llm-awq" in a.source_note
    assert a.layers["rtn_rel"].gt(0).all() and a.layers["gain"].notna().all()
    assert analyze(AnalysisSettings(**{**settings.__dict__, "model": "bundled"}), llm_cache).path == a.path
    with pytest.raises(ValueError, match="default group size is 64"):
        a.evaluate_layer("model.layers.0.self_attn.q_proj", alpha=0.5, bits=3, group_size=128)
