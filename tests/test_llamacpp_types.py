"""llama.cpp's quant types (core.grids.llamacpp): byte for byte as gguf.quants and llama-quantize write them.

Real tensors: the bundled SmolLM2-135M GGUF's ``blk.0.ffn_down`` (rows 1536 wide) and ``blk.0.attn_q`` (576 wide),
dequantized and multiplied by a per-input-channel scale (as AWQ's scaled weights are) so that they no longer sit on
the file's own Q4_1 grid. The llama-quantize tests skip when the binary is not built (tools/build_llamacpp.sh).
"""
from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from core.grids import llamacpp as L

NAMES = ("blk.0.ffn_down.weight", "blk.0.attn_q.weight")


def _bundled_reader():
    gguf = pytest.importorskip("gguf")
    from core.model.gguf_file import GGUFError, bundled_gguf
    try:
        return gguf.GGUFReader(str(bundled_gguf()))
    except GGUFError as e:
        pytest.skip(str(e))


def _scaled(w: np.ndarray) -> np.ndarray:
    """``w * s`` with AWQ-like per-input-channel scales ``s = mean|w|^0.5`` normalised (deterministic)."""
    s = np.sqrt(np.abs(w).mean(axis=0) + 1e-6)
    s = s / np.sqrt(s.max() * s.min())
    return (w * s[None, :]).astype(np.float32)


@pytest.fixture(scope="module")
def weights() -> dict[str, np.ndarray]:
    """``{GGUF tensor name: float32 [rows, cols]}`` for ``NAMES`` (see the module docstring)."""
    r = _bundled_reader()
    out = {}
    for t in r.tensors:
        if t.name in NAMES:
            shape = (int(t.shape[1]), int(t.shape[0]))  # GGUF lists [in, out]
            out[t.name] = _scaled(L.dequantize(np.asarray(t.data), t.tensor_type.name, shape))
    assert set(out) == set(NAMES)
    return out


@pytest.fixture(scope="module")
def imatrix(weights) -> dict[str, np.ndarray]:
    """Importance weights per tensor ``[cols]``: positive, uneven (a stand-in for mean x^2)."""
    rng = np.random.default_rng(0)
    return {n: (rng.gamma(0.5, 1.0, w.shape[1]) + 1e-3).astype(np.float32) for n, w in weights.items()}


def test_layouts_match_ggml():
    import gguf
    assert L.TYPES == ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")
    expect = {"Q4_0": 4.5, "Q4_1": 5.0, "Q5_0": 5.5, "Q5_1": 6.0, "Q8_0": 8.5, "Q2_K": 2.625, "Q3_K": 3.4375,
              "Q4_K": 4.5, "Q5_K": 5.5, "Q6_K": 6.5625}
    for t in L.TYPES:
        block, nbytes = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[t]]
        assert (L.block_size(t), L.LAYOUTS[t].block_bytes) == (block, nbytes)
        assert L.LAYOUTS[t].ggml_id == int(gguf.GGMLQuantizationType[t])
        assert L.bits_per_weight(t) == expect[t]
    assert [L.nominal_bits(t) for t in L.TYPES] == [4, 4, 5, 5, 8, 2, 3, 4, 5, 6]
    assert L.check_type("q4_k") == "Q4_K"
    with pytest.raises(ValueError, match="unknown llama.cpp type 'Q4_X'"):
        L.check_type("Q4_X")


def test_fallback_table():
    assert L.fallback("Q4_K", 1536) == "Q4_K"
    assert [L.fallback(t, 576) for t in L.K_TYPES] == ["Q4_0", "Q4_0", "Q5_0", "Q5_1", "Q8_0"]
    assert L.fallback("Q4_0", 576) == "Q4_0"
    assert L.fallback("Q4_0", 100) == L.F16 and L.fallback("Q6_K", 48) == L.F16


@pytest.mark.parametrize("type", L.LEGACY_TYPES)
def test_legacy_types_c_equals_gguf(weights, type):
    """The copied C reference and gguf.quants (numpy) give the same bytes; dequantize inverts the layout."""
    for w in weights.values():
        q = L.quantize(w, type)
        assert q.dtype == np.uint8 and q.shape == (w.shape[0], L.row_bytes(type, w.shape[1]))
        assert np.array_equal(q, L.quantize_c(w, type))
        d = L.dequantize(q, type, w.shape)
        step = np.abs(w).max() / 2 ** (L.nominal_bits(type) - 1)
        assert np.abs(d - w).max() <= step


def test_error_falls_with_bits_and_imatrix_helps_where_it_weighs(weights, imatrix):
    w, q = weights["blk.0.ffn_down.weight"], imatrix["blk.0.ffn_down.weight"]
    errs = []
    for t in ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"):
        plain = L.dequantize(L.quantize(w, t), t, w.shape)
        weighted = L.dequantize(L.quantize(w, t, q), t, w.shape)
        e_plain, e_weighted = (float((((d - w) ** 2) * q[None, :]).sum()) for d in (plain, weighted))
        assert e_weighted < e_plain, t  # the importance-weighted search lowers the error it weighs
        errs.append(float(((plain - w) ** 2).mean()))
    assert errs == sorted(errs, reverse=True)
    assert not np.array_equal(L.quantize(w, "Q4_0", q), L.quantize(w, "Q4_0"))


def test_fake_quantize_applies_the_fallback(weights):
    w = torch.from_numpy(weights["blk.0.attn_q.weight"])  # 576 wide: Q4_K -> Q5_0
    assert torch.equal(L.fake_quantize(w, "Q4_K"), L.fake_quantize(w, "Q5_0"))
    w16 = w[:, :48].contiguous()  # 48 wide: not even a block of 32 -> F16
    assert torch.equal(L.fake_quantize(w16, "Q4_0"), w16.half().float())
    with pytest.raises(ValueError, match="multiple of 256"):
        L.quantize(weights["blk.0.attn_q.weight"], "Q4_K")
    with pytest.raises(ValueError, match="NaN"):
        L.quantize(np.full((2, 32), np.nan, np.float32), "Q4_0")
    with pytest.raises(ValueError, match="input channels"):
        L.quantize(weights["blk.0.attn_q.weight"], "Q4_0", np.ones(5, np.float32))


# --- against llama-quantize itself --------------------------------------------------------------------------------

def _quantize_tool() -> Path:
    p = L.tool_path("llama-quantize")
    if p is None:
        pytest.skip("llama-quantize is not built (run tools/build_llamacpp.sh, or set AWQ_EXPLORER_LLAMACPP)")
    return p


def write_f32_gguf(path: Path, tensors: dict[str, np.ndarray]) -> Path:
    """A GGUF llama-quantize accepts: the bundled file's scalar metadata (architecture, hyper-parameters) and
    ``tensors`` (``{name: float32 [rows, cols]}``) in F32. llama-quantize only needs the hyper-parameters."""
    import gguf
    r = _bundled_reader()
    arch = r.fields["general.architecture"].contents()
    w = gguf.GGUFWriter(str(path), arch=arch)
    for k, f in r.fields.items():
        if k.startswith("GGUF.") or k == "general.architecture" or f.types[0] == gguf.GGUFValueType.ARRAY:
            continue
        w.add_key_value(k, f.contents(), f.types[0])
    for name, a in tensors.items():
        w.add_tensor(name, np.ascontiguousarray(a, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def llama_quantize(src: Path, dst: Path, type: str, imatrix: Path | None = None) -> dict[str, tuple[str, np.ndarray]]:
    """Run ``llama-quantize --pure`` and read its tensors back: ``{name: (type, uint8 [rows, row bytes])}``."""
    import gguf
    cmd = [str(_quantize_tool()), "--pure", *(["--imatrix", str(imatrix)] if imatrix else []), str(src), str(dst),
           type, "2"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    out = {}
    for t in gguf.GGUFReader(str(dst)).tensors:
        rows = int(t.shape[1])
        out[t.name] = (t.tensor_type.name, np.asarray(t.data).reshape(rows, -1))
    return out


@pytest.fixture(scope="module")
def f32_gguf(weights, tmp_path_factory) -> Path:
    _quantize_tool()
    return write_f32_gguf(tmp_path_factory.mktemp("llamacpp") / "f32.gguf", weights)


@pytest.mark.parametrize("type", L.TYPES)
def test_bytes_equal_llama_quantize(weights, f32_gguf, tmp_path, type):
    """Every type (and llama-quantize's fallback for the 576-wide rows) equals llama-quantize's bytes."""
    got = llama_quantize(f32_gguf, tmp_path / "q.gguf", type)
    assert set(got) == set(NAMES)
    for name, (written, data) in got.items():
        w = weights[name]
        assert written == L.fallback(type, w.shape[1])
        assert np.array_equal(L.quantize(w, written), data), (name, written)
