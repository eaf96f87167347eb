"""Runs llm-compressor on a model folder with given calibration tokens; meant for llm-compressor's own environment
(``bench/llmc_env.sh`` makes ``.llmc-venv``), so it imports nothing from ``core``.

    .llmc-venv/bin/python bench/llmc_run.py --model DIR --ids calib.pt --out weights.safetensors \\
        (--recipe recipe.yaml | --awq BITS --group-size 64 [--no-duo]) [--save DIR]

``--ids``: a ``torch.save``d int64 tensor ``[n, seqlen]`` of calibration token blocks (the explorer's own), given
to ``oneshot`` as a dataset of exactly those rows (no shuffling, no truncation). ``--recipe``: an llm-compressor
YAML (the explorer's plan export); ``--awq``: ``AWQModifier(duo_scaling=on|off)`` then a ``QuantizationModifier``
(``int``, asymmetric, ``group`` strategy) of ``Linear`` minus ``lm_head``, llm-compressor's own AWQ recipe.

Writes ``--out``: every parameter of the quantized model as the model computes with it (float32; each quantized
linear's weight fake-quantized by compressed-tensors with the scale / zero point llm-compressor chose; norms with
AWQ's scales folded in), and prints one JSON line: ``oneshot_s`` / ``oneshot_cpu_s`` (the wall / process CPU
time of ``oneshot`` alone), versions.
``--save``: also ``save_pretrained(save_compressed=True)`` there (its own compressed-tensors checkpoint).

llm-compressor 0.14 on a machine without an accelerator stops in AWQ with "Cannot access accelerator device when
none is available", raised by ``Tensor.pin_memory`` in its intermediates cache; pinning only speeds copies to a
GPU, so on a CPU-only machine it is made a no-op here (no number changes).
"""
from __future__ import annotations

import argparse
import json
import time

import torch


def cpu_pin_memory() -> None:
    """``Tensor.pin_memory`` -> identity when there is no accelerator (see the module docstring)."""
    if not torch.accelerator.is_available():
        torch.Tensor.pin_memory = lambda self, *a, **k: self


def awq_recipe(bits: int, group_size: int, duo: bool) -> list:
    from llmcompressor.modifiers.quantization import QuantizationModifier
    from llmcompressor.modifiers.transform.awq import AWQModifier

    weights = {"num_bits": bits, "type": "int", "symmetric": False, "strategy": "group", "group_size": group_size}
    return [AWQModifier(duo_scaling=duo),
            QuantizationModifier(config_groups={"group_0": {"targets": ["Linear"], "weights": weights}},
                                 ignore=["lm_head"])]


def dequantized_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter as the quantized model computes with it (quantized linears fake-quantized), tied tensors
    once."""
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize

    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for mname, mod in model.named_modules():
        scheme = getattr(mod, "quantization_scheme", None)
        for pname, p in mod.named_parameters(recurse=False):
            if pname in ("weight_scale", "weight_zero_point", "weight_g_idx", "weight_global_scale"):
                continue
            key = f"{mname}.{pname}" if mname else pname
            if p.data_ptr() in seen:
                continue
            seen.add(p.data_ptr())
            v = p.detach()
            if pname == "weight" and scheme is not None and scheme.weights is not None and hasattr(mod, "weight_scale"):
                v = fake_quantize(v, mod.weight_scale, getattr(mod, "weight_zero_point", None), scheme.weights)
            out[key] = v.float().contiguous().clone()
    return out


def tool_parser() -> argparse.ArgumentParser:
    """The arguments every tool runner takes (this one, ``bench/gptqmodel_run.py``): the model folder, the
    calibration tokens, the weights file to write, the tool's own checkpoint folder to keep, the base group size."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--ids", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--save")
    ap.add_argument("--group-size", type=int, default=64)
    return ap


def main() -> None:
    ap = tool_parser()
    ap.add_argument("--recipe")
    ap.add_argument("--awq", type=int)
    ap.add_argument("--no-duo", action="store_true")
    ap.add_argument("--tokenizer", help="tokenizer folder (default: the model folder)")
    args = ap.parse_args()
    cpu_pin_memory()
    import compressed_tensors
    import llmcompressor
    import transformers as tf
    from datasets import Dataset
    from llmcompressor import oneshot
    from safetensors.torch import save_file

    ids = torch.load(args.ids)
    ds = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
    model = tf.AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    recipe = args.recipe if args.recipe else awq_recipe(args.awq, args.group_size, not args.no_duo)
    t0, c0 = time.perf_counter(), time.process_time()
    processor = tf.AutoTokenizer.from_pretrained(args.tokenizer or args.model)  # oneshot wants one with a dataset
    oneshot(model=model, dataset=ds, recipe=recipe, processor=processor, num_calibration_samples=ids.shape[0],
            max_seq_length=ids.shape[1], shuffle_calibration_samples=False)
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    save_file(dequantized_state(model), args.out)
    if args.save:
        model.save_pretrained(args.save, save_compressed=True)
    print(json.dumps({"oneshot_s": seconds, "oneshot_cpu_s": cpu, "llmcompressor": llmcompressor.__version__,
                      "compressed_tensors": compressed_tensors.__version__, "transformers": tf.__version__,
                      "torch": torch.__version__, "threads": torch.get_num_threads()}))


if __name__ == "__main__":
    main()
