"""llama.cpp importance matrices (core.model.imatrix): written from the explorer's statistics, read back (GGUF and
legacy .dat), refused when corrupt, accepted by llama-quantize and close to what llama-imatrix itself measures."""
from __future__ import annotations

import struct
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from core.grids import llamacpp as L
from core.model import imatrix as IM


def _stats(seed: int = 0) -> dict[str, tuple[np.ndarray, int]]:
    rng = np.random.default_rng(seed)
    return {"blk.0.attn_q.weight": (rng.gamma(0.5, 1.0, 64) * 300, 300),
            "blk.0.ffn_down.weight": (rng.gamma(0.5, 1.0, 128) * 300, 300)}


def test_round_trip(tmp_path):
    st = _stats()
    p = IM.write_imatrix(tmp_path / "a" / "imatrix.gguf", st, dataset="calib.txt", chunk_size=64, chunk_count=5)
    assert p.read_bytes()[:4] == b"GGUF" and not list(p.parent.glob(".*tmp"))
    im = IM.read_imatrix(p)
    assert im.format == "gguf" and im.names == sorted(st)
    assert (im.datasets, im.chunk_count, im.chunk_size) == (("calib.txt",), 5, 64)
    for name, (s, c) in st.items():
        assert im.counts[name].tolist() == [c]
        # what llama-quantize computes: float32 sum / float32 count
        assert np.array_equal(im.importance(name), s.astype(np.float32) / np.float32(c))
        assert np.allclose(im.values[name], s / c, rtol=1e-6)
    t = im.table(top=3).set_index("tensor")
    v = st["blk.0.ffn_down.weight"][0]
    assert t.loc["blk.0.ffn_down.weight", "top_channels"] == np.argsort(-v)[:3].tolist()
    assert t.loc["blk.0.attn_q.weight", "channels"] == 64 and t.loc["blk.0.attn_q.weight", "tokens"] == 300
    assert t.loc["blk.0.ffn_down.weight", "max_over_median"] == pytest.approx(v.max() / np.median(v), rel=1e-5)


def test_legacy_dat_is_read(tmp_path):
    """The legacy binary layout (llama-imatrix --output-format dat): sums stored as (sum / count) * ncall."""
    st = _stats(1)
    ncall = 3
    buf = struct.pack("<i", len(st))
    for name, (s, c) in st.items():
        vals = (s / c * ncall).astype(np.float32)
        buf += struct.pack("<i", len(name)) + name.encode() + struct.pack("<ii", ncall, vals.size) + vals.tobytes()
    buf += struct.pack("<i", 7) + struct.pack("<i", 8) + b"data.txt"
    p = tmp_path / "imatrix.dat"
    p.write_bytes(buf)
    im = IM.read_imatrix(p)
    assert im.format == "legacy" and im.chunk_count == 7 and im.datasets == ("data.txt",)
    for name, (s, c) in st.items():
        assert np.allclose(im.importance(name), s / c, rtol=1e-6)
    p.write_bytes(buf[:40])
    with pytest.raises(IM.ImatrixError, match="neither GGUF nor a complete legacy imatrix"):
        IM.read_imatrix(p)


def test_bad_files_and_statistics_are_refused(tmp_path):
    import gguf
    with pytest.raises(IM.ImatrixError, match="no imatrix file"):
        IM.read_imatrix(tmp_path / "missing.gguf")
    good = IM.write_imatrix(tmp_path / "good.gguf", _stats())
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(good.read_bytes()[:200])
    with pytest.raises(IM.ImatrixError, match="not a readable GGUF file"):
        IM.read_imatrix(cut)
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"\x00" * 64)
    with pytest.raises(IM.ImatrixError, match="neither GGUF nor a legacy imatrix"):
        IM.read_imatrix(junk)
    w = gguf.GGUFWriter(str(tmp_path / "model.gguf"), arch="llama")  # a GGUF that is no imatrix
    w.add_tensor("blk.0.attn_q.weight", np.zeros((2, 32), np.float32))
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    with pytest.raises(IM.ImatrixError, match="holds no imatrix data"):
        IM.read_imatrix(tmp_path / "model.gguf")
    bad = {"blk.0.attn_q.weight": (np.array([1.0, np.nan]), 4)}
    with pytest.raises(IM.ImatrixError, match="not finite non-negative"):
        IM.write_imatrix(tmp_path / "bad.gguf", bad)
    assert not (tmp_path / "bad.gguf").exists()


@pytest.fixture(scope="module")
def tiny_analysis(tiny_dir, tokenizer_dir, tmp_path_factory):
    from conftest import tiny_settings
    from core.analysis import analyze
    return analyze(tiny_settings(tiny_dir("llama"), tokenizer_dir), tmp_path_factory.mktemp("imatrix-cache"))


def test_analysis_statistics_are_the_sum_of_squares(tiny_analysis, tmp_path):
    """From the analysis' per-channel mean and std: n * (std^2 + mean^2) equals the diagonal of X^T X (its kept
    Hessian, summed over the same calibration tokens), under llama.cpp's tensor names."""
    a = tiny_analysis
    st = IM.analysis_stats(a)
    names = dict(zip(a.linears["name"], a.linears["block"]))
    assert len(st) == len(names) == 14
    assert {"blk.0.attn_q.weight", "blk.1.ffn_down.weight", "blk.1.attn_output.weight"} <= set(st)
    n = a.manifest["n_tokens"]
    for module, gname in (("model.layers.1.mlp.down_proj", "blk.1.ffn_down.weight"),
                          ("model.layers.0.self_attn.q_proj", "blk.0.attn_q.weight")):
        s, c = st[gname]
        assert c == n
        h = a.hessian(module)
        assert h is not None
        assert np.allclose(s, torch.diag(h).double().numpy(), rtol=1e-4, atol=1e-6)
    assert np.array_equal(st["blk.0.attn_q.weight"][0], st["blk.0.attn_v.weight"][0])  # one input, one record
    assert np.array_equal(IM.mean_sq(a, "model.layers.1.mlp.down_proj") * n, st["blk.1.ffn_down.weight"][0])
    p = IM.write_imatrix(tmp_path / "tiny.gguf", a)
    im = IM.read_imatrix(p)
    assert im.chunk_size == a.settings.calibration.seqlen and im.chunk_count == n // im.chunk_size
    assert np.allclose(im.values["blk.1.ffn_down.weight"], st["blk.1.ffn_down.weight"][0] / n, rtol=1e-6)


# --- against llama.cpp's own tools ---------------------------------------------------------------------------------

def _tool(name: str) -> Path:
    p = L.tool_path(name)
    if p is None:
        pytest.skip(f"{name} is not built (run tools/build_llamacpp.sh, or set AWQ_EXPLORER_LLAMACPP)")
    return p


N_CTX, N_CHUNKS = 128, 2


def test_llama_imatrix_agrees_with_the_explorer(smollm2_folder, tmp_path):
    """llama-imatrix on the bundled GGUF and the explorer's statistics over the same tokens (2 chunks of 128; the
    GGUF adds no BOS, so both see the text's tokens as they are; where llama.cpp's Python bindings are installed
    the test also checks that its tokenizer gives the explorer's token ids) agree per channel within a tolerance,
    and llama-quantize accepts the explorer's file and weighs with it as core.grids.llamacpp does.

    Why not exactly: llama.cpp multiplies the Q4_1 weights with activations rounded to 8 bits (its Q8_1 dot
    products), keeps K/V in f16 and sums in another order; the explorer runs the same weights dequantized in
    float32. Measured on 4 chunks (30 blocks x 7 tensors): the median over tensors of the per-tensor median relative difference
    of mean x^2 is 0.4%; the largest per-tensor median is 3.1% and the lowest correlation of log mean x^2 is 0.987,
    both on attn_output (its input is the attention output, where the f16 K/V and the 8-bit activations of the
    attention products add up). Allowed: per-tensor median < 5%, median over tensors < 1%, correlation > 0.98.
    """
    tool = _tool("llama-imatrix")
    from core.model import collect, models
    from core.model.calibration import load_text, to_blocks, tokenize
    from core.model.gguf_file import bundled_gguf, module_to_tensor

    lm = models.load_model(str(smollm2_folder))
    text = load_text("bundled")
    ids = tokenize(lm.tokenizer, text)
    blocks = to_blocks(ids, N_CHUNKS, N_CTX)
    try:
        import llama_cpp
    except ImportError:
        llama_cpp = None
    if llama_cpp is not None:
        vocab = llama_cpp.Llama(model_path=str(bundled_gguf()), vocab_only=True, verbose=False)
        assert vocab.tokenize(text.encode(), add_bos=False, special=False)[: blocks.numel()] == blocks.reshape(-1).tolist()
    tf = tmp_path / "text.txt"
    tf.write_text(text)
    out = tmp_path / "llama.imatrix.gguf"
    r = subprocess.run([str(tool), "-m", str(bundled_gguf()), "-f", str(tf), "-c", str(N_CTX), "--chunks",
                        str(N_CHUNKS), "--no-ppl", "-t", "2", "-o", str(out)], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    theirs = IM.read_imatrix(out)
    assert theirs.chunk_count == N_CHUNKS and theirs.chunk_size == N_CTX

    col = collect.collect(lm, blocks, sample_rows=16, heldout_rows=0)
    names = [li.name for li in lm.linears]
    mapping = module_to_tensor(names, "llama", max(li.block for li in lm.linears) + 1)
    ours = {}
    for n in names:
        s = col.stats[col.input_of[n]]
        ours[mapping[n]] = ((s.std.double() ** 2 + s.mean.double() ** 2).numpy() * col.n_tokens, col.n_tokens)
    assert set(ours) == set(theirs.names)
    medians = []
    for name, (s, c) in ours.items():
        assert theirs.counts[name].tolist() == [c]  # the same number of tokens
        a, b = s / c, theirs.importance(name).astype(np.float64)
        medians.append(float(np.median(np.abs(a - b) / np.maximum(np.abs(b), 1e-12))))
        assert medians[-1] < 5e-2, name
        assert np.corrcoef(np.log(a + 1e-12), np.log(b + 1e-12))[0, 1] > 0.98, name
    assert np.median(medians) < 1e-2

    # the explorer's file (every tensor of the model) is one llama-quantize takes, and uses it
    from test_llamacpp_types import write_f32_gguf
    mine = IM.write_imatrix(tmp_path / "ours.imatrix.gguf", ours, chunk_size=N_CTX, chunk_count=N_CHUNKS)
    w = lm.weight("model.layers.0.mlp.down_proj").numpy()  # streamed: read from the checkpoint
    src = write_f32_gguf(tmp_path / "f32.gguf", {"blk.0.ffn_down.weight": w})
    res = subprocess.run([str(_tool("llama-quantize")), "--pure", "--imatrix", str(mine), str(src),
                          str(tmp_path / "q.gguf"), "Q4_K", "2"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    assert f"loaded {len(ours)} importance matrix entries" in res.stdout + res.stderr
    import gguf
    t = gguf.GGUFReader(str(tmp_path / "q.gguf")).tensors[0]
    mine_bytes = L.quantize(w, "Q4_K", IM.read_imatrix(mine).importance("blk.0.ffn_down.weight"))
    assert np.array_equal(np.asarray(t.data).reshape(mine_bytes.shape), mine_bytes)
