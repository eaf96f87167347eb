"""The explorer's AWQ beside llm-compressor's (issue 20), and the explorer's llm-compressor recipe run by
llm-compressor itself.

    .venv/bin/python bench/llmc_bench.py [--quick] [--workdir DIR] [--json FILE]

``bench_llmc(quick, workdir)`` -> dict (for bench/run.py); ``report_llmc(res, row)`` prints it. Same model (the
bundled SmolLM2-135M), same calibration tokens (the analysis' 8 x 256 blocks, handed to llm-compressor as its
dataset), same held-out tokens, same grid (g64, asymmetric), one scorer for all (``evaluate.score_variants`` with
Model quality's protocol): mean KL, p99, same_top and perplexity for llm-compressor's ``AWQModifier`` (duo scaling
on, its default, and off) beside the explorer's awq, awq-grouped, awq-clip and awq-gptq at w3 and w4, with the
time each took to quantize (one width alone; llm-compressor: the wall time of ``oneshot``, model loading and
saving excluded; the explorer: its model half with its shared search on all calibration blocks,
``explorer_variant``). llm-compressor runs in its own environment (``bench/llmc_env.sh`` creates ``.llmc-venv``; ``bench/llmc_run.py``
is what runs there).

Round trip: plans (rtn, gptq, awq-grouped; layers of even blocks at w3, odd ones at w4, g64) exported as
llm-compressor recipes (``core.studies.plan_export.llmcompressor_recipe``), applied by llm-compressor to the same
model, and the gptq plan's GPTQModel ``dynamic`` dict (``plan_export.gptqmodel_dynamic``) applied by GPTQModel
(``bench/gptqmodel_env.sh`` creates ``.gptqmodel-venv``; ``bench/gptqmodel_run.py`` runs there), each with the
calibration tokens the explorer's prediction used (the first ``evaluate.SEARCH_TOKENS`` of the analysis' blocks, the
searches' budget); reported: mean KL between its model and the explorer's prediction for the same plan
(``core.studies.export.prepare_export``, what the exporters write), and each one's mean KL to fp, on the held-out
tokens.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

LLMC_VENV = ROOT / ".llmc-venv"
EXPLORER_AWQ = ("rtn", "awq", "awq-grouped", "awq-clip", "awq-gptq")
ROUND_TRIP = ("rtn", "gptq", "awq-grouped", "gptqmodel")  # gptqmodel: the gptq plan's dynamic dict in GPTQModel
GPTQMODEL_VENV = ROOT / ".gptqmodel-venv"
GROUP = 64
METRICS = ("kl", "kl_p99", "same_top", "perplexity")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def venv_python(venv: Path = LLMC_VENV, script: str = "llmc_env.sh") -> Path:
    """A tool environment's interpreter, created by its ``bench/<script>`` when missing (llm-compressor's by
    default; GPTQModel's: ``GPTQMODEL_VENV``, ``gptqmodel_env.sh``)."""
    py = venv / "bin" / "python"
    r = subprocess.run(["bash", str(ROOT / "bench" / script)], capture_output=True, text=True)
    if r.returncode != 0 or not py.exists():
        raise RuntimeError(f"bench/{script} failed: {(r.stderr or r.stdout).strip().splitlines()[-1:]}")
    return py


def run_llmc(py: Path, model_dir: str, ids_file: Path, out: Path, extra: list[str], script: str = "llmc_run.py"
             ) -> dict:
    """``bench/<script>`` (``llmc_run.py`` in llm-compressor's environment, ``gptqmodel_run.py`` in GPTQModel's);
    its JSON line. A result of the same command kept in the work folder (``out`` and its ``.json``, written after a
    successful run) is reused: ``reused`` is then True (``--fresh`` removes them)."""
    cmd = [str(py), str(ROOT / "bench" / script), "--model", model_dir, "--ids", str(ids_file),
           "--out", str(out), *extra]
    meta = out.with_suffix(".json")
    if out.exists() and meta.exists():
        kept = json.loads(meta.read_text())
        if kept.get("cmd") == cmd:
            return {**kept["result"], "reused": True}
    r = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if r.returncode != 0:
        tail = [ln for ln in r.stderr.strip().splitlines() if ln.strip()][-3:]
        raise RuntimeError(f"{script} failed: {' | '.join(tail)}")
    result = json.loads(r.stdout.strip().splitlines()[-1])
    meta.write_text(json.dumps({"cmd": cmd, "result": result, "load": os.getloadavg()[0]}))
    return {**result, "reused": False}


def llmc_variant(lm, weights_file: Path):
    """llm-compressor's model as an explorer variant: its linears' fake-quantized weights, and every other block
    parameter it changed (norms with AWQ's scales folded in)."""
    from safetensors.torch import load_file

    from core.studies.evaluate import FoldedWeights

    state = load_file(str(weights_file))
    names = {li.name for li in lm.linears}
    weights = {n: state[f"{n}.weight"] for n in names}
    params = dict(lm.model.named_parameters())
    changed = {k: v for k, v in state.items() if k not in {f"{n}.weight" for n in names} and k in params
               and not torch.equal(v, params[k].detach().float())}
    return FoldedWeights(weights, changed)


def scored(df) -> dict[str, dict[str, float]]:
    """``{variant: {metric: value}}`` of ``score_variants`` rows."""
    out: dict[str, dict[str, float]] = {}
    for r in df.itertuples():
        out.setdefault(r.variant, {})[r.metric] = float(r.value)
    return out


def analysis_for(quick: bool, workdir: Path):
    from core.analysis import AnalysisSettings, analyze
    from core.model.calibration import CalibrationSpec
    from core.studies.sweep import SweepSettings

    bits = (4,) if quick else (3, 4)
    cal = CalibrationSpec(n_samples=2 if quick else 8, seqlen=256, heldout_samples=2 if quick else 8)
    settings = AnalysisSettings(model="smollm2", calibration=cal, sample_rows=128 if quick else 512,
                                heldout_rows=128 if quick else 512,
                                sweep=SweepSettings(bits=bits, group_size=GROUP, zero_point=True, n_grid=20))
    return analyze(settings, workdir / "cache"), bits


def pair_figures(a, variants: dict, max_tokens: int | None) -> dict[str, dict[str, float]]:
    """For each ``name: (explorer variant, llm-compressor variant)``: mean KL(explorer || llm-compressor) between
    the two models and each one's mean KL to fp, on the first held-out blocks."""
    from core.model.blocks import restore, snapshot
    from core.model.calibration import first_blocks
    from core.model.collect import model_lock
    from core.studies import evaluate
    from core.studies.ct_export import against_fp, compare_logits

    lm = a.lm
    held = first_blocks(evaluate.eval_data(a, lm).heldout, max_tokens)
    out = {}
    with model_lock(lm.model), torch.no_grad():
        snap = snapshot(lm)
        try:
            ref = torch.cat([lm.model(input_ids=b.unsqueeze(0)).logits.float() for b in held])
            for name, (ours_v, theirs_v) in variants.items():
                logits = []
                for v in (ours_v, theirs_v):
                    evaluate.apply_variant(lm, v, snap)
                    logits.append(torch.cat([lm.model(input_ids=b.unsqueeze(0)).logits.float() for b in held]))
                    restore(lm, snap)
                between = compare_logits(*logits)
                out[name] = {"kl_between": between["mean_kl"], "same_top_between": between["same_top"],
                             "explorer_kl": against_fp(ref, logits[0], held)["kl"],
                             "llmc_kl": against_fp(ref, logits[1], held)["kl"], "tokens": int(held.numel())}
        finally:
            restore(lm, snap)
    return out


def explorer_variant(a, data, snap, method: str, spec):
    """``method``'s model half at ``spec`` after its shared search, as Model quality runs it
    (``core.studies.export.run_method``) but with every calibration block as the search budget (the same tokens
    llm-compressor gets)."""
    from core.methods import METHODS, ModelContext
    from core.studies import evaluate

    m, quiet = METHODS[method], (lambda f, msg: None)
    ctx = ModelContext(a, a.lm, data, snap, ("fp", method), (spec.bits,), spec.group_size, spec.zero_point,
                       int(a.settings.sweep.n_grid), int(a.settings.batch_tokens), int(data.calib.numel()),
                       evaluate.CONST_ALPHA_TOKENS)
    if m.shared is not None:
        ctx.memo[m.shared.name] = m.shared.run(ctx, quiet)
    return m.model(ctx, spec, m.options(), quiet)


def mixed_plan(a, method: str):
    """Even blocks at w3, odd blocks at w4, g64: a BitPlan (for the recipe) and its JSON (for prepare_export)."""
    import math

    from core.studies.plan import BitPlan

    layers = {}
    for r in a.linears.itertuples():
        layers[r.name] = (3 if int(r.block) % 2 == 0 else 4, GROUP)
    plan = BitPlan(model=a.model_id, method=method, budget_bits=4.0, zero_point=True, layers=layers,
                   avg_bits=float("nan"), objective=math.nan, exact=True, slack_bits=0.0, source="bench")
    js = {"method": method, "zero_point": True,
          "layers": {n: {"bits": b, "group_size": g} for n, (b, g) in layers.items()}}
    return plan, js


def bench_llmc(quick: bool, workdir: Path, fresh: bool = False, parts: tuple[str, ...] = ("awq", "recipes"),
               only_bits: tuple[int, ...] | None = None, methods: tuple[str, ...] = EXPLORER_AWQ,
               duo: tuple[bool, ...] = (True, False), recipes: tuple[str, ...] = ROUND_TRIP) -> dict:
    import yaml

    from core.grids.spec import QuantSpec
    from core.model.blocks import restore, snapshot
    from core.model.collect import model_lock
    from core.model.models import resolve_source
    from core.studies import evaluate
    from core.studies import export as ex
    from core.studies.plan_export import llmcompressor_recipe, validate_recipe

    workdir.mkdir(parents=True, exist_ok=True)
    if fresh:
        for f in [*workdir.glob("*.safetensors"), *workdir.glob("*.json")]:
            f.unlink()
    py = venv_python()
    a, bits = analysis_for(quick, workdir)
    bits = tuple(b for b in bits if only_bits is None or b in only_bits)
    lm = a.lm
    model_dir = resolve_source("smollm2", cache_dir=workdir / "cache").path
    data = evaluate.eval_data(a, lm)
    ids_file = workdir / "calib_ids.pt"
    tmp = ids_file.with_name(f".{ids_file.name}.{os.getpid()}")
    torch.save(data.calib.clone(), tmp)
    os.replace(tmp, ids_file)  # atomic: another part of the bench may be reading it
    res: dict = {"llmc_calib": list(data.calib.shape), "llmc_heldout_tokens": int(data.heldout.numel()),
                 "llmc_load_before": os.getloadavg()[0], "llmc_seconds": {}, "llmc_cpu_seconds": {},
                 "llmc_scores": {}}
    variants: dict = {}
    # llm-compressor's AWQ, duo scaling on and off
    versions = {}
    for b in bits if {"awq", "llmc"} & set(parts) else ():
        for on in duo:
            name = f"llmc-awq{'' if on else '-noduo'} w{b}"
            log(f"llmc bench: {name} ...")
            out = workdir / f"{name.replace(' ', '_')}.safetensors"
            got = run_llmc(py, model_dir, ids_file, out,
                           ["--awq", str(b), "--group-size", str(GROUP)] + ([] if on else ["--no-duo"]))
            res["llmc_seconds"][name] = got["oneshot_s"]
            res["llmc_cpu_seconds"][name] = got.get("oneshot_cpu_s")
            res.setdefault("llmc_reused", []).extend([name] if got["reused"] else [])
            versions = {k: v for k, v in got.items() if k != "oneshot_s"}
            variants[name] = llmc_variant(lm, out)
    # the explorer's methods, one width at a time, timed as Model quality runs them
    for b in bits if {"awq", "explorer"} & set(parts) else ():
        spec = QuantSpec(b, GROUP, True)
        for m in methods:
            log(f"llmc bench: explorer {m} w{b} ...")
            with model_lock(lm.model), torch.no_grad():
                snap = snapshot(lm)
                try:
                    t0, c0 = time.perf_counter(), time.process_time()
                    v = explorer_variant(a, data, snap, m, spec)
                    res["llmc_seconds"][f"{m} w{b}"] = time.perf_counter() - t0
                    res["llmc_cpu_seconds"][f"{m} w{b}"] = time.process_time() - c0
                finally:
                    restore(lm, snap)
            variants[f"{m} w{b}"] = v
    res["llmc_versions"] = versions
    log("llmc bench: scoring every variant with one scorer ...")
    protocol = getattr(evaluate, "PROTOCOL", None)
    kw = {"protocol": protocol} if protocol is not None else {}
    if variants:
        df = evaluate.score_variants(a, {k: (lambda v=v: v) for k, v in variants.items()}, **kw)
        res["llmc_scores"] = {k: {m: v[m] for m in METRICS if m in v} for k, v in scored(df).items()}
    res["llmc_protocol"] = protocol or "all-positions"
    # the round trip: the explorer's recipes run by llm-compressor, its dynamic dict by GPTQModel, on the tokens the
    # explorer's prediction used (the searches' budget)
    from core.model.calibration import first_blocks
    from core.studies.plan_export import gptqmodel_dynamic, validate_dynamic

    res["llmc_round_trip"] = {}
    pairs, predicted = {}, {}
    search_ids = workdir / "search_ids.pt"
    if "recipes" in parts:
        torch.save(first_blocks(data.calib, evaluate.SEARCH_TOKENS).clone(), search_ids)
        res["llmc_round_trip_calib"] = list(first_blocks(data.calib, evaluate.SEARCH_TOKENS).shape)
    for m in () if "recipes" not in parts else recipes[:1] if quick else recipes:
        method = "gptq" if m == "gptqmodel" else m
        plan, js = mixed_plan(a, method)
        log(f"llmc bench: round trip {m} ...")
        try:
            if m == "gptqmodel":
                dyn = gptqmodel_dynamic(plan)
                validate_dynamic(dyn, plan, a.names)
                path = workdir / "gptqmodel_dynamic.json"
                path.write_text(json.dumps(dyn, indent=1))
                got = run_llmc(venv_python(GPTQMODEL_VENV, "gptqmodel_env.sh"), model_dir, search_ids,
                               workdir / "rt-gptqmodel.safetensors",
                               ["--dynamic", str(path), "--bits", "4", "--group-size", str(GROUP)],
                               script="gptqmodel_run.py")
                got["oneshot_s"] = got["quantize_s"]
            else:
                recipe = workdir / f"recipe-{m}.yaml"
                recipe.write_text(yaml.safe_dump(llmcompressor_recipe(plan), sort_keys=False, width=1 << 16))
                validate_recipe(yaml.safe_load(recipe.read_text()), plan, a.names)
                got = run_llmc(py, model_dir, search_ids, workdir / f"rt-{m}.safetensors", ["--recipe", str(recipe)])
        except RuntimeError as e:
            res["llmc_round_trip"][m] = {"error": str(e)}
            continue
        t0 = time.perf_counter()
        if method not in predicted:
            predicted[method] = ex.prepare_export(a, method=method, plan=js).fake_weights()
        pairs[m] = (predicted[method], llmc_variant(lm, workdir / f"rt-{m}.safetensors"))
        res["llmc_round_trip"][m] = {"llmc_s": got["oneshot_s"], "explorer_s": time.perf_counter() - t0,
                                     "tool": "GPTQModel" if m == "gptqmodel" else "llm-compressor"}
    for m, figs in pair_figures(a, pairs, 512 if quick else None).items():
        res["llmc_round_trip"][m].update(figs)
    res["llmc_load_after"] = os.getloadavg()[0]
    return res


def report_llmc(res: dict, row) -> None:
    load = f"load average {res['llmc_load_before']:.2f} -> {res['llmc_load_after']:.2f}"
    row("llmc: calibration / held-out", f"{res['llmc_calib'][0]} x {res['llmc_calib'][1]}",
        f"{res['llmc_heldout_tokens']} held-out tokens, protocol {res['llmc_protocol']}; {load}")
    for k, v in res["llmc_scores"].items():
        s = res["llmc_seconds"].get(k)
        row(f"  {k}", f"KL {v.get('kl', float('nan')):.3f}",
            f"p99 {v.get('kl_p99', float('nan')):.3f}, same_top {v.get('same_top', float('nan')):.3f}, "
            f"ppl {v.get('perplexity', float('nan')):.2f}" + (f", {s:.1f} s" if s is not None else ""))
    for m, v in res["llmc_round_trip"].items():
        if "error" in v:
            row(f"  recipe {m}", "failed", v["error"])
        else:
            row(f"  recipe {m}", f"KL between {v['kl_between']:.4f}",
                f"explorer KL {v['explorer_kl']:.4f}, {v.get('tool', 'llm-compressor')} KL {v['llmc_kl']:.4f}, same top "
                f"{100 * v['same_top_between']:.1f}%, {v['tokens']} tokens")


def fmt_s(v) -> str:
    return "" if v is None else f"{v:.1f}"


def markdown(res: dict) -> str:
    """The side-by-side table (BENCHMARKS.md)."""
    lines = ["| variant | mean KL | KL p99 | same_top | perplexity | quantize s (wall) | quantize s (CPU) |",
             "|---|---|---|---|---|---|---|"]
    for k, v in res["llmc_scores"].items():
        s = res["llmc_seconds"].get(k)
        lines.append(f"| {k} | {v.get('kl', float('nan')):.3f} | {v.get('kl_p99', float('nan')):.3f} | "
                     f"{v.get('same_top', float('nan')):.3f} | {v.get('perplexity', float('nan')):.2f} | "
                     f"{fmt_s(s)} | {fmt_s(res['llmc_cpu_seconds'].get(k))} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="w4 only, 2 x 256 calibration tokens, one recipe")
    ap.add_argument("--workdir", default=str(ROOT / "tmp" / "llmc-bench"))
    ap.add_argument("--json", default=None, help="also write the results as JSON here")
    ap.add_argument("--fresh", action="store_true", help="rerun llm-compressor even where the work folder has its result")
    ap.add_argument("--parts", default="awq,recipes",
                    help="awq (the side-by-side table: llmc + explorer, or one of them), recipes (the round trip)")
    ap.add_argument("--bits", default=None, help="only these widths (e.g. 4)")
    ap.add_argument("--methods", default=",".join(EXPLORER_AWQ), help="the explorer's methods")
    ap.add_argument("--duo", default="on,off", help="llm-compressor's duo scaling settings to run")
    ap.add_argument("--recipes", default=",".join(ROUND_TRIP), help="the plans' methods of the round trip")
    args = ap.parse_args()
    split = lambda v: tuple(x.strip() for x in v.split(",") if x.strip())  # noqa: E731
    res = bench_llmc(args.quick, Path(args.workdir), args.fresh, split(args.parts),
                     None if args.bits is None else tuple(int(b) for b in split(args.bits)), split(args.methods),
                     tuple(d == "on" for d in split(args.duo)), split(args.recipes))
    report_llmc(res, lambda a, b, c="": print(f"{a:<34} {b:>22}  {c}"))
    print(markdown(res))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1, default=str))


if __name__ == "__main__":
    main()
