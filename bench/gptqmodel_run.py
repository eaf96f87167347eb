"""Runs GPTQModel on a model folder with given calibration tokens and a ``dynamic`` dict; meant for GPTQModel's own
environment (``bench/gptqmodel_env.sh`` makes ``.gptqmodel-venv``), so it imports nothing from ``core``.

    .gptqmodel-venv/bin/python bench/gptqmodel_run.py --model DIR --ids calib.pt --dynamic dynamic.json \\
        --bits 4 --group-size 64 [--sym] --out weights.safetensors [--save DIR]

``--ids``: a ``torch.save``d int64 tensor ``[n, seqlen]`` of calibration token blocks (the explorer's own), given to
``quantize`` as exactly those rows. ``--dynamic``: the explorer's ``gptqmodel_dynamic.json``
(``core.studies.plan_export.gptqmodel_dynamic``: per-module ``bits`` / ``group_size`` overrides and ``-:`` skips);
``--bits`` / ``--group-size`` / ``--sym``: the base ``QuantizeConfig`` a module without an override takes. GPTQ's
own settings are the explorer's ``GPTQOptions`` defaults, not GPTQModel's: ``damp_percent`` 0.01 (GPTQModel: 0.05),
no activation ordering (``desc_act`` False, ``act_group_aware`` False; GPTQModel turns the latter on by default),
groups chosen as GPTQ reaches them (``static_groups`` False).

Writes ``--out``: each quantized linear's weight ``[out, in]`` as GPTQModel's own kernel dequantizes it from the
saved checkpoint (float32), and prints one JSON line: ``quantize_s`` / ``quantize_cpu_s`` (wall / process CPU time of
``quantize`` alone), ``n_quantized``, versions. ``--save``: keep GPTQModel's checkpoint there.

GPTQModel 7.7.0's default CPU worker pool refuses a 2-core machine ("Virtual pool 'model_loader:cpu' requests 2
workers but parent 'cpu' only has 1") unless ``GPTQMODEL_CPU_WORKERS`` is set: it is set to the core count here.
"""
from __future__ import annotations

import json
import os
import tempfile
import time

os.environ.setdefault("GPTQMODEL_CPU_WORKERS", str(max(2, os.cpu_count() or 2)))

import torch  # noqa: E402


def dequantized_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """``{module.weight: [out, in] float32}`` of every GPTQModel quantized linear (modules with ``qweight``), by its own
    ``dequantize_weight`` (GPTQ's layout is ``[in, out]``; checked against the module's shape)."""
    out = {}
    for name, mod in model.named_modules():
        if not hasattr(mod, "qweight") or not hasattr(mod, "dequantize_weight"):
            continue
        w = mod.dequantize_weight().float()
        n_in, n_out = int(mod.in_features), int(mod.out_features)
        if tuple(w.shape) == (n_in, n_out):
            w = w.T
        if tuple(w.shape) != (n_out, n_in):
            raise RuntimeError(f"{name}: dequantized weight {tuple(w.shape)}, expected ({n_out}, {n_in})")
        out[f"{name}.weight"] = w.contiguous().clone()
    return out


def main() -> None:
    from llmc_run import tool_parser  # bench/ is the script's folder, so on sys.path

    ap = tool_parser()
    ap.add_argument("--dynamic", required=True)
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--sym", action="store_true")
    ap.add_argument("--damp", type=float, default=0.01)
    args = ap.parse_args()
    import gptqmodel
    import transformers as tf
    from gptqmodel import GPTQModel, QuantizeConfig
    from safetensors.torch import save_file

    ids = torch.load(args.ids)
    dynamic = json.loads(open(args.dynamic).read())
    cfg = QuantizeConfig(bits=args.bits, group_size=args.group_size, sym=args.sym, desc_act=False,
                         act_group_aware=False, static_groups=False, damp_percent=args.damp, dynamic=dynamic)
    model = GPTQModel.load(args.model, cfg, device="cpu")
    cal = [{"input_ids": row.tolist(), "attention_mask": [1] * int(row.numel())} for row in ids]
    t0, c0 = time.perf_counter(), time.process_time()
    model.quantize(cal, batch_size=1)
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.save or tmp
        model.save(folder)
        reloaded = GPTQModel.load(folder, device="cpu")
        weights = dequantized_weights(reloaded.model)
    save_file(weights, args.out)
    print(json.dumps({"quantize_s": seconds, "quantize_cpu_s": cpu, "n_quantized": len(weights),
                      "gptqmodel": gptqmodel.__version__, "transformers": tf.__version__, "torch": torch.__version__,
                      "threads": torch.get_num_threads()}))


if __name__ == "__main__":
    main()
