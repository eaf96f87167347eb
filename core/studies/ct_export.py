"""compressed-tensors export: the explorer's quantized model as a ``pack-quantized`` checkpoint (what llm-compressor
writes, vLLM serves and transformers loads), and its check by reloading.

The folder holds ``model.safetensors`` (each quantized linear as ``weight_packed`` int32, ``weight_scale``
``[out, n_groups]`` float32, ``weight_zero_point`` packed like the codes when asymmetric, ``weight_shape``; every
other parameter as the export model folded it, e.g. norms divided by AWQ's scales), ``config.json`` with a
``quantization_config`` (one config group per (bits, group size, symmetric) whose ``targets`` are the exact module
names; every other ``nn.Linear``, ``lm_head`` and linears a plan keeps in full precision, listed in ``ignore``), the
tokenizer and the generation config.

The integer codes are the explorer's own: each linear's grid comes from its method (``ExportLinear.params``:
GPTQ's per-group grids, for awq-gptq in the folded coordinates) or, for a Recipe (rtn, awq-grouped, awq-clip), from
the clipped folded weight the Recipe rounds (``core.grids.quant.choose_qparams``, the grid ``pseudo_quantize``
uses); the codes are read off the explorer's quantized weight ``fake`` and the writer refuses a linear whose codes
do not give ``fake`` back bit for bit. Conventions: ours is ``q = clamp(round(w / s) + z, 0, 2^b - 1)``,
``w_hat = (q - z) s`` (asymmetric) and ``q`` in ``[-2^(b-1), 2^(b-1) - 1]`` with ``z = 0`` (symmetric);
compressed-tensors stores signed codes in ``[-2^(b-1), 2^(b-1) - 1]`` for both and dequantizes ``(q - z) s``, so an
asymmetric code and zero are both shifted by ``-2^(b-1)`` (``q - z`` unchanged).

HQQ is refused (``HQQ_REASON``): its zero point is a float, and pack-quantized, the one compressed-tensors format
vLLM serves for weight-only integer weights (vLLM's ``CompressedTensorsConfig._get_scheme_from_parts`` builds
``CompressedTensorsWNA16`` only for ``format == "pack-quantized"``, else "No compressed-tensors compatible scheme was
found"), stores zero points as b-bit integers packed like the codes (compressed-tensors 0.19
``PackedQuantizationCompressor.compress``: ``pack_to_int32(zero_point, weights.num_bits, packed_dim=0)``;
``decompress`` unpacks them with ``unpack_from_int32``; vLLM's WNA16 ``weight_zero_point`` is a packed int32
parameter). ``QuantizationArgs.zp_dtype`` can name a float dtype and the ``naive-quantized`` compressor would keep
such a zero unpacked, but vLLM does not serve that format for weight-only integer weights (the sentence above), and
rounding HQQ's zero to an integer changes its weights.

Reloading (``verify``): transformers 5.23 with compressed-tensors 0.19 cannot load an asymmetric pack-quantized
checkpoint through its default path (it sizes ``weight_zero_point`` unpacked and refuses the packed tensor: also
llm-compressor's own checkpoints), and its ``dequantize=True`` path decompresses every linear with the *first*
config group's scheme. So a single-group folder is loaded with ``from_pretrained(..., dequantize=True)``; a mixed one
is built from its config with transformers and each linear is decompressed by compressed-tensors'
``PackedQuantizationCompressor`` with its own group's scheme (what that path does, per group). transformers 5.17
(llm-compressor's environment, ``bench/llmc_env.sh``) loads both through its default path; ``tests/test_ct_export.py``
checks that too when the environment exists.
"""
from __future__ import annotations

import json
import time
import warnings
from pathlib import Path
from typing import Any, Mapping

import torch

from ..grids import quant
from ..grids.spec import QuantSpec
from ..model.blocks import restore, snapshot
from ..model.calibration import first_blocks
from ..model.collect import model_lock
from . import evaluate
from .export import ExportError, ExportLinear, ExportModel, Progress, register_format

FORMAT = "compressed-tensors"
WEIGHTS_FILE = "model.safetensors"
# the tolerance of the reload check: the reloaded weights are the explorer's bit for bit, so the two models differ
# only in the order of float32 operations (measured: 0 on the bundled LLM and the tiny test models)
MAX_LOGIT_DIFF = 1e-3
MAX_MEAN_KL = 1e-6
SKIP_FILES = {"config.json", "model.safetensors.index.json", "conversion.json"}
METHODS = ("rtn", "awq-grouped", "awq-clip", "gptq", "awq-gptq")  # the model methods this format stores exactly
HQQ_REASON = ("HQQ's zero points are floats, and compressed-tensors' pack-quantized format (the one vLLM serves for "
              "weight-only integer weights) stores zero points as integers packed like the codes, so HQQ's weights "
              "cannot be written exactly; export rtn, awq-grouped, awq-clip, gptq or awq-gptq")


def _ct():
    """compressed-tensors, or an ExportError that says how to get it."""
    try:
        import compressed_tensors  # noqa: F401
    except ImportError:
        raise ExportError("the compressed-tensors export needs the compressed-tensors package "
                          "(pip install compressed-tensors==0.19.0)") from None
    return compressed_tensors


# ------------------------------------------------------------------------------------------------
# codes
# ------------------------------------------------------------------------------------------------
def linear_grid(li: ExportLinear) -> tuple[torch.Tensor, torch.Tensor]:
    """``(scale, zero) [out, n_groups]`` float32 of linear ``li``'s integer grid: the method's own (``params``) or,
    for a Recipe's linear, the grid of ``quant.choose_qparams`` on the clipped folded weight it rounds."""
    spec, w = li.spec, li.weight.float()
    g = spec.group(w.shape[1])
    if li.params is not None:
        scale, zero = li.params[0], li.params[1]
    else:
        qp = quant.choose_qparams(w.reshape(-1, g), spec.bits, spec.zero_point)
        scale, zero = qp.scale, qp.zero
    n_groups = w.shape[1] // g
    return scale.float().reshape(w.shape[0], n_groups), zero.float().reshape(w.shape[0], n_groups)


def linear_codes(li: ExportLinear) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """compressed-tensors' ``(codes int8 [out, in], scale float32 [out, n_groups], zero int8 [out, n_groups] or None
    when symmetric)`` of ``li``, read off its quantized weight ``fake``; ExportError unless ``(codes - zero) * scale``
    gives ``fake`` back bit for bit."""
    spec, fake = li.spec, li.fake.float()
    out, n_in = fake.shape
    scale, zero = linear_grid(li)
    g = n_in // scale.shape[1]
    s, z = scale.unsqueeze(-1), zero.unsqueeze(-1)
    q = torch.round(fake.reshape(out, -1, g) / s) + z
    lo, hi = (0, 2 ** spec.bits - 1) if spec.zero_point else (-(2 ** (spec.bits - 1)), 2 ** (spec.bits - 1) - 1)
    back = ((q - z) * s).reshape(out, n_in)
    if q.min() < lo or q.max() > hi or not torch.equal(back, fake):
        bad = float((back - fake).abs().max())
        raise ExportError(f"{li.name}'s quantized weight does not lie on an integer {spec.key} grid of the "
                          f"coordinates the file stores (max |difference| {bad:.3g}; Q(W s)/s where the scales have "
                          f"no preceding operator to fold into is one such weight), so it cannot be packed")
    shift = 2 ** (spec.bits - 1) if spec.zero_point else 0  # unsigned levels -> compressed-tensors' signed ones
    codes = (q - shift).reshape(out, n_in).to(torch.int8)
    return codes, scale.contiguous(), (zero - shift).to(torch.int8) if spec.zero_point else None


def scheme_key(spec: QuantSpec, in_features: int) -> tuple[int, int, bool]:
    """A config group's identity: ``(bits, group size along in or 0 for one group per row, symmetric)``."""
    return spec.bits, (0 if spec.group_size is None or spec.group_size <= 0 else int(spec.group_size)), \
        not spec.zero_point


def weights_args(key: tuple[int, int, bool]) -> dict:
    bits, g, symmetric = key
    args = {"num_bits": bits, "type": "int", "symmetric": symmetric, "dynamic": False,
            "strategy": "group" if g else "channel"}
    if g:
        args["group_size"] = g
    return args


def check_model(model: ExportModel) -> None:
    """ExportError (one sentence) when the export model cannot be stored as pack-quantized."""
    if model.method == "hqq":
        raise ExportError(HQQ_REASON)
    lm = model.analysis.lm
    if not lm.is_causal:
        raise ExportError("the compressed-tensors export writes causal language models (AutoModelForCausalLM)")
    for n, li in model.linears.items():
        if li.spec is None:
            continue
        if li.spec.format:
            raise ExportError(f"{n} is set to llama.cpp's {li.spec.format}, which compressed-tensors does not store; "
                              f"export integer grids (bits / group size)")
        if not isinstance(lm.model.get_submodule(n), torch.nn.Linear):
            raise ExportError(f"{n} is a {type(lm.model.get_submodule(n)).__name__}, not an nn.Linear, which "
                              f"compressed-tensors does not pack")


# ------------------------------------------------------------------------------------------------
# writing
# ------------------------------------------------------------------------------------------------
def quantization_config(groups: Mapping[tuple[int, int, bool], list[str]], ignore: list[str]) -> dict:
    """``config.json``'s ``quantization_config``, validated by compressed-tensors' own ``QuantizationConfig``."""
    ct = _ct()
    from compressed_tensors.quantization import QuantizationConfig

    cfg = QuantizationConfig(
        config_groups={f"group_{i}": {"targets": sorted(names), "weights": weights_args(key)}
                       for i, (key, names) in enumerate(sorted(groups.items()))},
        format="pack-quantized", ignore=sorted(ignore), quantization_status="compressed")
    return {"version": ct.__version__, "quant_method": "compressed-tensors", "sparsity_config": {},
            "transform_config": {}, **cfg.model_dump(exclude={"quant_method"})}


def _unshared(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` without the second name of a tied tensor (``lm_head.weight`` of tied embeddings): safetensors
    stores one copy, transformers ties them again from the config."""
    seen: set[int] = set()
    out = {}
    for k, v in state.items():
        ptr = v.untyped_storage().data_ptr()
        if ptr in seen and v.numel():
            continue
        seen.add(ptr)
        out[k] = v.detach().cpu().contiguous()
    return out


def write_compressed_tensors(model: ExportModel, out: Path, progress: Progress | None = None) -> dict:
    """Write ``model`` into the (empty) folder ``out`` as a compressed-tensors ``pack-quantized`` checkpoint (module
    docstring). Returns the summary: ``groups`` (``w4g64 asym: 210 linears``), ``quantized`` / ``kept`` linear counts,
    ``bytes`` of the weights file and ``bits_per_weight`` of the quantized linears (codes, scales and zeros)."""
    report = progress or (lambda f, m: None)
    check_model(model)
    _ct()
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32
    from safetensors.torch import save_file

    out = Path(out)
    lm = model.analysis.lm
    tensors = _unshared(model.state)
    groups: dict[tuple[int, int, bool], list[str]] = {}
    quantized = [n for n, li in model.linears.items() if li.spec is not None]
    stored_bits = 0
    for i, n in enumerate(quantized):
        li = model.linears[n]
        codes, scale, zero = linear_codes(li)
        tensors[f"{n}.weight_packed"] = pack_to_int32(codes, li.spec.bits)
        tensors[f"{n}.weight_scale"] = scale
        tensors[f"{n}.weight_shape"] = torch.tensor(tuple(codes.shape), dtype=torch.int64)
        if zero is not None:
            tensors[f"{n}.weight_zero_point"] = pack_to_int32(zero, li.spec.bits, packed_dim=0).contiguous()
        stored_bits += codes.numel() * li.spec.bits + scale.numel() * 32 + (0 if zero is None else zero.numel() * li.spec.bits)
        groups.setdefault(scheme_key(li.spec, codes.shape[1]), []).append(n)
        report(0.8 * (i + 1) / max(1, len(quantized)), f"packing {n}")
    for n, li in model.linears.items():
        if li.spec is None:
            tensors[f"{n}.weight"] = li.fake.to(lm.model.get_submodule(n).weight.dtype).contiguous()
    ignore = [name for name, mod in lm.model.named_modules()
              if isinstance(mod, torch.nn.Linear) and name not in set(quantized)]
    report(0.85, "writing the weights")
    save_file(tensors, str(out / WEIGHTS_FILE), metadata={"format": "pt"})
    config = lm.model.config.to_dict()
    config.pop("quantization_config", None)
    config["quantization_config"] = quantization_config(groups, ignore)
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    report(0.9, "copying the tokenizer and the generation config")
    if getattr(lm.model, "generation_config", None) is not None:
        lm.model.generation_config.save_pretrained(str(out))
    lm.tokenizer.save_pretrained(str(out))
    for f in out.iterdir():
        if f.name in SKIP_FILES - {"config.json"}:
            f.unlink()
    n_weights = sum(model.linears[n].fake.numel() for n in quantized)
    report(1.0, "written")
    return {"groups": {group_label(k): len(v) for k, v in sorted(groups.items())}, "quantized": len(quantized),
            "kept": len(model.linears) - len(quantized), "ignored": sorted(ignore),
            "bytes": (out / WEIGHTS_FILE).stat().st_size,
            "bits_per_weight": stored_bits / max(1, n_weights)}


def group_label(key: tuple[int, int, bool]) -> str:
    bits, g, symmetric = key
    return f"w{bits}{f'g{g}' if g else ' per-row'} {'sym' if symmetric else 'asym'}"


# ------------------------------------------------------------------------------------------------
# reading back
# ------------------------------------------------------------------------------------------------
def read_groups(folder: str | Path) -> dict[str, dict]:
    """``{module name: weights args}`` of a compressed-tensors folder's config: each quantized linear's
    ``num_bits``, ``group_size``, ``symmetric`` as the file states them."""
    cfg = json.loads((Path(folder) / "config.json").read_text())["quantization_config"]
    out = {}
    for group in cfg["config_groups"].values():
        for t in group["targets"]:
            out[t] = dict(group["weights"])
    return out


def load_checkpoint(folder: str | Path) -> tuple[torch.nn.Module, str]:
    """The causal LM of a compressed-tensors folder, dequantized to float32, and how it was loaded (module
    docstring: transformers' ``from_pretrained`` for one config group; transformers' model from the config with
    compressed-tensors' decompressor per linear for several)."""
    _ct()
    import transformers as tf

    folder = Path(folder)
    cfg = json.loads((folder / "config.json").read_text())["quantization_config"]
    if len(cfg["config_groups"]) == 1:
        with warnings.catch_warnings():  # "the quantization_config from the model will be used": as meant
            warnings.filterwarnings("ignore", message=".*already has a `quantization_config`", category=UserWarning)
            model = tf.AutoModelForCausalLM.from_pretrained(
                str(folder), dtype=torch.float32, quantization_config=tf.CompressedTensorsConfig(dequantize=True))
        return model.eval(), "transformers from_pretrained (dequantize=True)"
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationScheme
    from safetensors.torch import load_file

    config = tf.AutoConfig.from_pretrained(str(folder))
    config.quantization_config = None
    del config.quantization_config
    model = tf.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    stored = load_file(str(folder / WEIGHTS_FILE))
    state: dict[str, torch.Tensor] = {}
    for group in cfg["config_groups"].values():
        scheme = QuantizationScheme(targets=group["targets"], weights=group["weights"])
        for n in group["targets"]:
            parts = {k[len(n) + 1:]: stored.pop(k) for k in list(stored) if k.startswith(n + ".weight_")}
            state[f"{n}.weight"] = PackedQuantizationCompressor.decompress(parts, scheme)["weight"]
    state.update(stored)
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
    if unexpected or set(missing) - tied:
        raise ExportError(f"the checkpoint does not match its config (missing {sorted(set(missing) - tied)[:3]}, "
                          f"unexpected {sorted(unexpected)[:3]})")
    model.tie_weights()
    return model, "transformers model + compressed-tensors decompressor per config group"


def compare_logits(a: torch.Tensor, b: torch.Tensor) -> dict[str, float]:
    """``a`` (the explorer's) against ``b`` (the reloaded model's) logits ``[..., vocab]``: max |difference|,
    mean KL(softmax a || softmax b) in nats, and the share of positions with the same argmax."""
    from ..grids.metrics import token_divergence

    la, lb = torch.log_softmax(a.double(), -1), torch.log_softmax(b.double(), -1)
    kl, same, _ = token_divergence(la, lb, a.argmax(-1))
    return {"max_logit_diff": float((a - b).abs().max()), "mean_kl": float(kl.mean()),
            "same_top": float(same.double().mean())}


def against_fp(ref: torch.Tensor, logits: torch.Tensor, ids: torch.Tensor) -> dict[str, float]:
    """Perplexity of ``logits [n, seqlen, vocab]`` on the next tokens of ``ids [n, seqlen]``, and its mean KL /
    same-top share against the fp model's ``ref`` (``core.grids.metrics``' definitions; every position but the last
    of each block is scored)."""
    from ..grids.metrics import perplexity_with_se, token_divergence

    lr = torch.log_softmax(ref[:, :-1].double(), -1)
    lq = torch.log_softmax(logits[:, :-1].double(), -1)
    y = ids[:, 1:]
    kl, same, _ = token_divergence(lr, lq, y)
    ce = -lq.gather(-1, y.unsqueeze(-1)).squeeze(-1)
    ppl, _ = perplexity_with_se(float(ce.sum()), float((ce * ce).sum()), ce.numel())
    return {"perplexity": ppl, "kl": float(kl.mean()), "same_top": float(same.double().mean())}


def verify_compressed_tensors(model: ExportModel, folder: Path, progress: Progress | None = None,
                              max_tokens: int | None = 512) -> dict[str, Any]:
    """Reload ``folder`` (``load_checkpoint``) on CPU and compare its logits with the explorer's fake-quantized model
    (``model.fake_weights()`` in the analysis' model) on the first held-out blocks (``max_tokens``; 512 when None).

    Returns ``compare_logits``' figures between the two (``max_logit_diff``, ``mean_kl``, ``same_top``), ``ok``
    (within ``MAX_LOGIT_DIFF`` and ``MAX_MEAN_KL``), ``rows``: perplexity, mean KL and same-top share against the fp
    model for the reloaded model (``runtime``) and the explorer's (``explorer``), ``runtime`` / ``loader`` (what
    loaded it), ``n_tokens``, ``protocol``, ``tolerance``, ``agreement`` (one line) and ``seconds``. Every quantized
    linear's bits / group size / symmetric as the checkpoint states them is checked against the export model
    first (ExportError otherwise)."""
    import transformers

    report = progress or (lambda f, m: None)
    t0 = time.perf_counter()
    report(0.0, "reloading the checkpoint")
    read = read_groups(folder)
    for n, li in model.linears.items():
        want = None if li.spec is None else scheme_key(li.spec, li.fake.shape[1])
        got = read.get(n)
        got_key = None if got is None else (got["num_bits"], int(got.get("group_size") or 0), bool(got["symmetric"]))
        if got_key != want:
            raise ExportError(f"the checkpoint states {got_key} for {n}, the export model {want}")
    reloaded, how = load_checkpoint(folder)
    lm = model.analysis.lm
    held = first_blocks(evaluate.eval_data(model.analysis, lm).heldout, 512 if max_tokens is None else max_tokens)
    report(0.4, "running the fp, the explorer's and the reloaded model on the held-out tokens")

    def run(m: torch.nn.Module) -> torch.Tensor:
        return torch.cat([m(input_ids=b.unsqueeze(0)).logits.float() for b in held])

    with model_lock(lm.model), torch.no_grad():
        ref = run(lm.model)
        snap = snapshot(lm)
        try:
            evaluate.apply_variant(lm, model.fake_weights(), snap)
            ours = run(lm.model)
        finally:
            restore(lm, snap)
        theirs = run(reloaded)
    figures = compare_logits(ours, theirs)
    mine, got = against_fp(ref, ours, held), against_fp(ref, theirs, held)
    rows = [{"metric": k, "runtime": got[k], "explorer": mine[k]} for k in ("perplexity", "kl", "same_top")]
    ok = figures["max_logit_diff"] <= MAX_LOGIT_DIFF and figures["mean_kl"] <= MAX_MEAN_KL
    report(1.0, "compared")
    import compressed_tensors

    return {**figures, "ok": ok, "rows": rows, "loader": how, "n_tokens": int(held.numel()), "tokens": int(held.numel()),
            "runtime": f"transformers {transformers.__version__} + compressed-tensors {compressed_tensors.__version__} "
                       f"({how})",
            "protocol": "all positions of the first held-out blocks, no BOS",
            "tolerance": f"max |logit difference| <= {MAX_LOGIT_DIFF:g}, mean KL <= {MAX_MEAN_KL:g} nats",
            "agreement": f"{'within' if ok else 'OUTSIDE'} tolerance: max |logit difference| "
                         f"{figures['max_logit_diff']:.3g}, mean KL(explorer || reloaded) {figures['mean_kl']:.3g} "
                         f"nats, same top token {100 * figures['same_top']:.2f}%",
            "seconds": time.perf_counter() - t0}


register_format(FORMAT, write_compressed_tensors, verify_compressed_tensors)

__all__ = ["FORMAT", "METHODS", "HQQ_REASON", "write_compressed_tensors", "verify_compressed_tensors", "load_checkpoint", "read_groups",
           "linear_codes", "linear_grid", "quantization_config", "compare_logits", "against_fp", "MAX_LOGIT_DIFF", "MAX_MEAN_KL"]
