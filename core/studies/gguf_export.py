"""GGUF export (llama.cpp's file): the explorer's quantized model written so that llama.cpp runs it, and checked there.

Writing (``write_gguf``, registered as format ``"gguf"``): the source GGUF (the bundled SmolLM2's, or the ``.gguf``
an analysis was made from) gives every metadata key and the tokenizer, copied as they are (``general.file_type``
set to the export's main type). Its tensors are written in the source's order:

* each quantizable linear in its llama.cpp type (``ExportLinear.spec.format``), rounded by
  ``core.grids.llamacpp.quantize`` from ``ExportLinear.weight`` (AWQ's scales folded in, clip applied); a type a
  row's width cannot take becomes llama-quantize's own fallback (``core.grids.llamacpp.fallback``); a linear kept in
  full precision is written in F32;
* ``attn_q`` / ``attn_k`` rows in GGUF's order: llama.cpp's converter permutes them for its rotary layout
  (``LlamaModel.permute``) and transformers' GGUF loader undoes it, so the explorer's weights are permuted back
  before they are written (a row permutation does not change a per-row block quantization);
* parameters the folding changed (RMSNorm weights divided by AWQ's scales) in F32;
* everything else (token embeddings, the output norm, ...) byte for byte as the source file stores it (the bundled
  SmolLM2 keeps its tied embeddings in Q8_0).

A model not loaded from a GGUF (a Hugging Face folder) is refused for now: its metadata and tokenizer would have to
be converted with llama.cpp's ``convert_hf_to_gguf.py``.

Verifying (``verify_gguf``): llama.cpp itself (the ``llama_cpp`` bindings built from the same vendored source as
the tools) loads the written file and evaluates the analysis' held-out blocks; its logits are scored with the
explorer's own metrics against the explorer's fp reference, beside the explorer's prediction for the very same
weights (``ExportModel.fake_weights()`` scored on the same blocks), and the two runtimes are compared directly
(mean KL between their next-token distributions, same top token).
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import torch

from ..model import gguf_file, score
from ..model.blocks import restore, snapshot
from ..model.calibration import first_blocks
from ..model.collect import model_lock
from ..model.models import SMOLLM2, canonical_model
from . import evaluate
from .export import ExportError, ExportModel, fallback_type, quantize_type, register_format

Progress = Callable[[float, str], None]
FILE_NAME = "model.gguf"
# Agreement of llama.cpp with the explorer for the very same weights (DESIGN.md section 10): llama.cpp keeps the KV
# cache in f16 and sums in other orders, which on the bundled Q4_1 file gave mean KL 0.003 (max 0.024) and 96.5%
# same top token. A verification passes when the mean KL between the two runtimes' next-token distributions stays
# under 10x that floor and their top tokens agree on at least 90% of the tokens.
AGREE_KL = 0.03
AGREE_TOP = 0.90
ATTEMPTS = 6  # llama-perplexity runs until its report is complete (llama_perplexity_kld)
VERIFY_METRICS = ("perplexity", "kl", "kl_p99", "same_top", "rms_dp")


def source_gguf(analysis) -> Path:
    """The GGUF file the analysis' model was loaded from (metadata and tokenizer of the export)."""
    model = canonical_model(analysis.settings.model)
    if model == SMOLLM2:
        return gguf_file.bundled_gguf()
    if gguf_file.is_gguf_path(model):
        return gguf_file.check_file(model)
    raise ExportError("a GGUF export needs a model loaded from a GGUF file (the bundled SmolLM2 or a .gguf path); "
                      "converting a Hugging Face folder's metadata and tokenizer is not supported yet")


def permute_rows(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's converter's row permutation of ``attn_q`` / ``attn_k`` (``LlamaModel.permute``; ``n_head``: the
    tensor's heads, ``head_count_kv`` for ``attn_k``): ``[out, in]`` in transformers' order -> GGUF's."""
    out = w.shape[0]
    return w.reshape(n_head, 2, out // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _tensor_names(model: ExportModel, arch: str, n_blocks: int) -> dict[str, str]:
    """GGUF tensor name -> HF parameter name, for the linears and the other parameters of ``model``."""
    import gguf

    arch_enum = {v: k for k, v in gguf.MODEL_ARCH_NAMES.items()}.get(arch)
    if arch_enum is None:
        raise ExportError(f"the gguf package has no tensor names for architecture {arch!r}")
    table = gguf.get_tensor_name_map(arch_enum, int(n_blocks))
    out: dict[str, str] = {}
    for hf in [f"{n}.weight" for n in model.linears] + list(model.state):
        base, _, leaf = hf.rpartition(".")
        g = table.get_name(base)
        if g is not None:
            out[f"{g}.{leaf}"] = hf
    return out


def _field_value(field) -> tuple[Any, Any, Any]:
    import gguf

    vtype = field.types[0]
    sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
    return field.contents(), vtype, sub


def _file_type(types: Mapping[str, int]) -> int | None:
    """``general.file_type`` of the export's most common linear type (llama.cpp's ``LlamaFileType``)."""
    import gguf

    if not types:
        return None
    main = max(types.items(), key=lambda kv: kv[1])[0]
    ft = getattr(gguf.LlamaFileType, f"MOSTLY_{main}", None)
    return None if ft is None else int(ft)


def write_gguf(model: ExportModel, folder: Path, progress: Progress) -> dict:
    """Write ``model`` as ``folder/model.gguf`` (module docstring); returns ``file``, ``bytes``, ``tensor_types``
    (how many tensors of each type), ``fallbacks`` (linear -> type written where its own could not be),
    ``linear_bits_per_weight`` (storage bits of the quantizable linears' tensors per weight, from the bytes written)."""
    import gguf

    src = source_gguf(model.analysis)
    reader = gguf_file._reader(src)
    arch = str(reader.fields["general.architecture"].contents())
    n_blocks = int(reader.fields[f"{arch}.block_count"].contents())
    n_head = int(reader.fields[f"{arch}.attention.head_count"].contents())
    kv = reader.fields.get(f"{arch}.attention.head_count_kv")
    n_head_kv = int(kv.contents()) if kv is not None else n_head
    names = _tensor_names(model, arch, n_blocks)
    linear_of = {f"{n}.weight": n for n in model.linears}
    missing = sorted(set(linear_of) - set(names.values()))
    if missing:
        raise ExportError(f"{missing[0].removesuffix('.weight')} has no tensor in {src.name}; the file and the "
                          f"analysis' model differ")
    path = folder / FILE_NAME
    writer = gguf.GGUFWriter(str(path), arch)
    counts: dict[str, int] = {}
    linear_types: dict[str, int] = {}
    fallbacks: dict[str, str] = {}
    linear_bits = linear_weights = 0
    try:
        for key, field in reader.fields.items():
            if key.startswith("GGUF.") or key in ("general.architecture", "general.file_type"):
                continue
            val, vtype, sub = _field_value(field)
            writer.add_key_value(key, val, vtype, sub_type=sub)
        tensors = list(reader.tensors)
        for i, t in enumerate(tensors):
            hf = names.get(t.name)
            if hf in linear_of:
                li = model.linears[linear_of[hf]]
                w = li.weight.float()
                if t.name.endswith("attn_q.weight"):
                    w = permute_rows(w, n_head)
                elif t.name.endswith("attn_k.weight"):
                    w = permute_rows(w, n_head_kv)
                linear_weights += w.numel()
                if li.spec is None:
                    writer.add_tensor(t.name, w.numpy().astype(np.float32))
                    tname = "F32"
                    linear_bits += 32 * w.numel()
                else:
                    if not li.spec.format:
                        raise ExportError(f"{li.name} is on the explorer's integer grid ({li.spec.key}), which a GGUF "
                                          f"cannot store; export with a llama.cpp type (--type Q4_0, ...)")
                    tname = fallback_type(li.spec.format, w.shape[1])
                    if tname != li.spec.format:
                        fallbacks[li.name] = tname
                    data = quantize_type(w, tname, li.imatrix)
                    writer.add_tensor(t.name, data, raw_dtype=gguf.GGMLQuantizationType[tname])
                    linear_bits += 8 * data.nbytes
                    linear_types[tname] = linear_types.get(tname, 0) + 1
            elif hf in model.folded:
                writer.add_tensor(t.name, model.state[hf].float().cpu().numpy().astype(np.float32))
                tname = "F32"
            else:
                writer.add_tensor(t.name, np.asarray(t.data), raw_dtype=t.tensor_type)
                tname = t.tensor_type.name
            counts[tname] = counts.get(tname, 0) + 1
            progress(0.9 * (i + 1) / len(tensors), f"{t.name} -> {tname}")
        ft = _file_type(linear_types)
        if ft is not None:
            writer.add_file_type(ft)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()
    gguf_file.check_file(path)
    arch2, formats = gguf_file.read_header(path)  # read back: every tensor there, of the type written
    if arch2 != arch or len(formats) != len(tensors):
        raise ExportError(f"the written {FILE_NAME} did not read back with all {len(tensors)} tensors")
    progress(1.0, f"wrote {FILE_NAME}")
    return {"file": str(path.name), "bytes": path.stat().st_size, "source": str(src), "tensor_types": counts,
            "fallbacks": fallbacks, "linear_bits_per_weight": linear_bits / max(1, linear_weights)}


# ------------------------------------------------------------------------------------------------
# verification in llama.cpp
# ------------------------------------------------------------------------------------------------
def llama_logits(path: Path, blocks: torch.Tensor, *, n_threads: int = 2) -> torch.Tensor:
    """llama.cpp's logits ``[n, t, vocab]`` float32 for each row of ``blocks [n, t]`` evaluated on its own (a fresh
    context per row, as the explorer evaluates each block), through the ``llama_cpp`` bindings."""
    try:
        import llama_cpp
    except ImportError as e:
        raise ExportError("verifying a GGUF needs llama.cpp's Python bindings (llama-cpp-python, built by "
                          "tools/build_llamacpp.sh); pass --no-verify to skip the check") from e
    llm = llama_cpp.Llama(str(path), logits_all=True, n_ctx=int(blocks.shape[1]), n_batch=int(blocks.shape[1]),
                          n_threads=n_threads, verbose=False)
    try:
        out = []
        for row in blocks.tolist():
            llm.reset()
            llm.eval(row)
            out.append(torch.from_numpy(np.array(llm.scores[:len(row)], dtype=np.float32)))
        return torch.stack(out)
    finally:
        llm.close()


def compare_logits(held: torch.Tensor, refs: list[torch.Tensor], explorer: torch.Tensor, llama: torch.Tensor,
                   causal: bool = True, protocol: str = score.LLAMACPP) -> tuple[score.Score, score.Score, dict[str, float]]:
    """The explorer's and llama.cpp's logits ``[n, t, vocab]`` for ``held [n, t]`` scored against the fp log-probs
    ``refs`` (``score.reference`` of the same rows, batch by batch, same ``protocol``), and the two runtimes against
    each other on the same scored positions: mean KL(explorer || llama.cpp), its maximum, and the share of tokens
    with the same top token."""
    from ..grids import metrics

    s_ex, s_ll = score.Score(causal, protocol), score.Score(causal, protocol)
    first = score.first_scored(protocol, held.shape[1])
    kls, same, n = [], 0, 0
    i = 0
    for ref in refs:
        b = ref.shape[0]
        ids = held[i:i + b]
        s_ex.add(ids, explorer[i:i + b], ref)
        s_ll.add(ids, llama[i:i + b], ref)
        lp_ex = torch.log_softmax(s_ex.scored(explorer[i:i + b]), dim=-1)
        lp_ll = torch.log_softmax(s_ll.scored(llama[i:i + b]), dim=-1)
        kl, st, _ = metrics.token_divergence(lp_ex, lp_ll, ids[:, 1 + first:])
        kls.append(kl.reshape(-1))
        same += int(st.sum())
        n += int(st.numel())
        i += b
    kl = torch.cat(kls).double()
    return s_ex, s_ll, {"kl_mean": float(kl.mean()), "kl_max": float(kl.max()), "same_top": same / max(1, n),
                        "n_tokens": n}


def verify_gguf(model: ExportModel, folder: Path, progress: Progress, max_tokens: int | None = None) -> dict:
    """Load ``folder/model.gguf`` in llama.cpp, evaluate the analysis' held-out blocks (the first whole ones within
    ``max_tokens``) and compare with the explorer's prediction for the same weights (module docstring). Returns
    ``rows`` (metric, llamacpp, explorer), ``agreement`` (the two runtimes against each other), ``ok``, ``runtime``,
    ``protocol``, ``tolerance``, ``n_tokens`` and the seconds each runtime took."""
    a = model.analysis
    lm = a.lm
    protocol = evaluate.PROTOCOL
    held = score.windows(lm, first_blocks(evaluate.eval_data(a, lm).heldout, max_tokens), protocol)
    progress(0.0, "explorer: fp reference and the exported weights")
    with model_lock(lm.model), torch.no_grad():
        snap = snapshot(lm)
        try:
            batches = score.eval_batches(lm, held, int(a.settings.batch_tokens))
            refs = score.reference(lm, batches, score.Score(lm.is_causal, protocol))
            t0 = time.perf_counter()
            evaluate.apply_variant(lm, model.fake_weights(), snap)
            explorer = torch.cat([score.output(lm, b) for b in batches])
            t_ex = time.perf_counter() - t0
        finally:
            restore(lm, snap)
    progress(0.4, "llama.cpp: evaluating the written file")
    t0 = time.perf_counter()
    llama = llama_logits(folder / FILE_NAME, held)
    t_ll = time.perf_counter() - t0
    if llama.shape != explorer.shape:
        raise ExportError(f"llama.cpp returned logits of shape {tuple(llama.shape)}, the explorer "
                          f"{tuple(explorer.shape)}: the written file's vocabulary differs from the model's")
    s_ex, s_ll, agree = compare_logits(held, refs, explorer, llama, lm.is_causal, protocol)
    m_ex, m_ll = s_ex.metrics(), s_ll.metrics()
    rows = [{"metric": k, "llamacpp": float(m_ll[k]), "explorer": float(m_ex[k])} for k in VERIFY_METRICS]
    ok = agree["kl_mean"] <= AGREE_KL and agree["same_top"] >= AGREE_TOP
    progress(1.0, "verified in llama.cpp" if ok else "llama.cpp disagrees with the explorer")
    agreement = (f"mean KL(explorer || llama.cpp) {agree['kl_mean']:.4f} nats (max {agree['kl_max']:.3f}), same top "
                 f"token {agree['same_top']:.1%} -> {'within' if ok else 'OUTSIDE'} the tolerance")
    return {"runtime": "llama.cpp (llama_cpp bindings, f16 KV cache)", "n_tokens": int(s_ll.n_tok),
            "protocol": f"{protocol}: {score.PROTOCOL_DEFINITIONS[protocol]}",
            "tolerance": f"mean KL between the runtimes <= {AGREE_KL} and same top token >= {AGREE_TOP:.0%} "
                         f"(10x the 0.003 floor measured for identical weights, DESIGN.md section 10)",
            "rows": rows, "agreement": agreement, "agree": agree, "ok": ok,
            "seconds_llamacpp": t_ll, "seconds_explorer": t_ex}


# ------------------------------------------------------------------------------------------------
# llama-perplexity --kl-divergence against the explorer's reference, on the explorer's tokens
# ------------------------------------------------------------------------------------------------
def _nearest_int(x: np.ndarray) -> np.ndarray:
    """llama.cpp's ``nearest_int`` (float32 magic-number rounding: half to even)."""
    v = (x.astype(np.float32) + np.float32(12582912.0)).astype(np.float32)
    return (v.view(np.int32) & 0x007FFFFF) - 0x00400000


def encode_log_probs(logits: np.ndarray) -> np.ndarray:
    """perplexity.cpp's ``log_softmax`` encoding of one token's logits ``[vocab]`` float32 as the ``nv`` uint16 of a
    ``--kl-divergence-base`` record: float32 scale and minimum log-prob, then each logit over the top 16 nats on 16
    bits (padded to an even count)."""
    x = logits.astype(np.float32)
    n_vocab = x.shape[0]
    mx, mn = np.float32(x.max()), np.float32(x.min())
    mn = np.float32(max(mn, np.float32(mx - np.float32(16))))
    sum_exp = float(np.exp((x - mx).astype(np.float32), dtype=np.float32).astype(np.float64).sum())
    lse = np.float32(np.log(sum_exp))
    min_log_prob = np.float32(mn - mx - lse)
    scale = np.float32((mx - mn) / np.float32(65535.0))
    out = np.zeros(2 * ((n_vocab + 1) // 2) + 4, dtype=np.uint16)
    out[:4] = np.array([scale, min_log_prob], dtype=np.float32).view(np.uint16)
    if scale:
        inv = np.float32(1) / scale
        q = np.where(x > mn, _nearest_int((inv * (x - mn)).astype(np.float32)), 0)
        out[4:4 + n_vocab] = q.astype(np.uint16)
    return out


def write_kld_base(path: Path, ids: torch.Tensor, logits: torch.Tensor) -> Path:
    """A ``llama-perplexity --kl-divergence-base`` file holding the windows ``ids [n, n_ctx]`` and the reference
    ``logits [n, n_ctx, vocab]`` of the predictions llama.cpp scores (positions n_ctx/2 .. n_ctx-2), so that
    ``llama-perplexity --kl-divergence`` evaluates a GGUF on exactly these tokens against this reference."""
    n, n_ctx = ids.shape
    first = n_ctx // 2
    with open(path, "wb") as f:
        f.write(b"_logits_")
        f.write(np.array([n_ctx], dtype=np.uint32).tobytes())
        f.write(np.array([logits.shape[-1], n], dtype=np.int32).tobytes())
        f.write(ids.to(torch.int32).numpy().tobytes())
        for w in range(n):
            rows = logits[w, first:n_ctx - 1].float().numpy()
            f.write(b"".join(encode_log_probs(r).tobytes() for r in rows))
    return path


_KLD_LINES = {"perplexity": r"Mean PPL\(Q\)\s*:\s*([\d.]+)\s*±\s*([\d.]+)",
              "kl": r"Mean\s+KLD:\s*([-\d.]+)\s*±\s*([\d.]+)",
              "kl_p99": r"99\.0%\s+KLD:\s*([-\d.]+)()",
              "rms_dp": r"RMS Δp\s*:\s*([\d.]+)\s*±\s*([\d.]+)\s*%",
              "same_top": r"Same top p:\s*([\d.]+)\s*±\s*([\d.]+)\s*%"}


def parse_kld_report(text: str) -> dict[str, float]:
    """The statistics of ``llama-perplexity --kl-divergence``'s report (Δp and same top as shares, not %):
    ``{metric: value, metric_se: ±}``."""
    import re

    out: dict[str, float] = {}
    for k, rx in _KLD_LINES.items():
        m = re.search(rx, text)
        if m is None:
            raise ExportError(f"llama-perplexity's report has no {k} line")
        div = 100.0 if k in ("rms_dp", "same_top") else 1.0
        out[k] = float(m.group(1)) / div
        if m.group(2):
            out[f"{k}_se"] = float(m.group(2)) / div
    return out


def llama_perplexity_kld(gguf_path: Path, base: Path, n_ctx: int, *, threads: int = 2, timeout: float = 900) -> dict:
    """Run ``llama-perplexity -m gguf_path --kl-divergence-base base --kl-divergence`` and parse its report."""
    import subprocess

    from .export import llamacpp

    mod = llamacpp()
    tool = mod.tool_path("llama-perplexity") if mod is not None else None
    if tool is None:
        raise ExportError("llama-perplexity is not built (tools/build_llamacpp.sh builds it)")
    # llama.cpp's logger is asynchronous: the last lines of the report (its statistics) were sometimes lost at exit
    # (seen here on a 4-window file, 1 run in 4 to a file, 3 in 4 through a pipe); the run is repeated until they are
    # there
    out = Path(base).with_suffix(".report")
    for attempt in range(ATTEMPTS):
        with open(out, "w") as f:  # a file, not a pipe: the report was lost far more often through a pipe
            r = subprocess.run([str(tool), "-m", str(gguf_path), "--kl-divergence-base", str(base), "--kl-divergence",
                                "-c", str(n_ctx), "-b", str(n_ctx), "-t", str(threads)],
                               stdout=f, stderr=subprocess.STDOUT, text=True, timeout=timeout)
        text = out.read_text(errors="replace")
        if r.returncode != 0:
            raise ExportError(f"llama-perplexity failed ({(text.strip().splitlines() or ['?'])[-1]})")
        try:
            return parse_kld_report(text)
        except ExportError:
            if attempt == ATTEMPTS - 1:
                raise
    raise AssertionError("unreachable")


register_format("gguf", write_gguf, verify_gguf)

__all__ = ["write_gguf", "verify_gguf", "write_kld_base", "encode_log_probs", "parse_kld_report",
           "llama_perplexity_kld", "llama_logits", "compare_logits", "permute_rows", "source_gguf", "FILE_NAME",
           "AGREE_KL", "AGREE_TOP"]
