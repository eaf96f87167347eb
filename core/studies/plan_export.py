"""A plan in the formats quantizers read (DESIGN.md section 8); every file is re-read and validated when written.

* JSON: ``{"model", "budget_bits", "method", "avg_bits", "source", "layers": {name: {"bits", "group_size"}},
  "measured", "measured_on", "selection", "baseline", "token_sets", "definitions"}``: ``measured`` holds the
  plan's figures on the test tokens (never used for a choice), ``baseline`` the best uniform configuration's
  within the budget, ``token_sets`` the three sets; group size 0 = one group per row. A plan in llama.cpp types
  gives each layer its ``"type"`` (with the type's level bits and block as ``bits`` / ``group_size``), which
  ``core.studies.export`` writes as it is (``python -m core export --plan plan.json``).
* llm-compressor recipe (YAML): ``QuantizationModifier`` (rtn), ``GPTQModifier`` (gptq) or ``AWQModifier``
  followed by ``QuantizationModifier`` (awq); ``config_groups`` hold one scheme per (bits, group size) whose
  ``targets`` are ``re:`` regexes matching exactly the plan's linears of that setting (compressed-tensors
  matches them with ``re.match``; one group per row is ``strategy: channel``); ``ignore`` lists the fp16 linears
  and ``lm_head``. A comment at the top carries the test figures.
* GPTQModel ``dynamic``: ``{"+:regex": {"bits", "group_size"}, "-:regex": {}}`` (``re.match``, first match
  wins, ``-:`` skips the module; group size -1 = one group per row, GPTQModel's per-channel).
* llama.cpp: ``--tensor-type blk.N.<tensor>=<TYPE>`` arguments for ``llama-quantize`` (``std::regex_search``
  of each argument's name in the tensor names). Types: the nearest GGUF type per bit-width; k-quants need
  rows that are a multiple of 256, so narrower rows get the nearest 32-block type at or above the bits; a plan in
  llama.cpp types names each tensor's own type.

A plan in llama.cpp types is written as JSON and llama.cpp arguments only (``formats_for``): llm-compressor and
GPTQModel store the integer grid.
"""
from __future__ import annotations

import json
import re
from collections import defaultdict
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import yaml

from ..grids.spec import choose
from ..model import store
from ..grids import llamacpp as _llamacpp
from .plan import DEFINITIONS, BitPlan, PlanReport

FORMATS = ("json", "llmcompressor", "gptqmodel", "llamacpp")
FILE_NAMES = {"json": "plan.json", "llmcompressor": "recipe.yaml", "gptqmodel": "gptqmodel_dynamic.json",
              "llamacpp": "llama_quantize_args.txt"}
GGUF_TENSOR = {"q": "attn_q", "k": "attn_k", "v": "attn_v", "qkv": "attn_qkv", "o": "attn_output",
               "gate": "ffn_gate", "up": "ffn_up", "down": "ffn_down"}
K_QUANT = {2: "Q2_K", 3: "Q3_K", 4: "Q4_K", 5: "Q5_K", 6: "Q6_K", 7: "Q8_0", 8: "Q8_0", 16: "F16"}
BLOCK32 = {2: "Q4_0", 3: "Q4_0", 4: "Q4_0", 5: "Q5_0", 6: "Q8_0", 7: "Q8_0", 8: "Q8_0", 16: "F16"}
BLOCK32_ZP = {2: "Q4_1", 3: "Q4_1", 4: "Q4_1", 5: "Q5_1", 6: "Q8_0", 7: "Q8_0", 8: "Q8_0", 16: "F16"}
QK_K = 256
TYPE_FORMATS = ("json", "llamacpp")  # the formats a plan in llama.cpp types is written in
# the method a plan's GGUF is written with: a plan's per-linear awq (Q(W s)/s) has no folded form a file can store, so
# its GGUF uses AWQ's folded, clipped form (awq-clip's scales searched once at the plan's most common setting)
PLAN_WRITERS = {"awq": "awq-clip"}


class ExportError(ValueError):
    """An export that cannot be written faithfully; the message is one sentence."""


def check_formats(formats: str | Iterable[str]) -> list[str]:
    return choose(formats, FORMATS, "export format", ExportError)


def formats_for(plan: BitPlan) -> tuple[str, ...]:
    """The formats ``plan`` can be written in: all of ``FORMATS``, or ``TYPE_FORMATS`` for a plan in llama.cpp types."""
    return TYPE_FORMATS if plan.in_types else FORMATS


def gguf_method(plan_method: str) -> str:
    """The method a plan made with ``plan_method`` is written to a GGUF with (``PLAN_WRITERS``)."""
    return PLAN_WRITERS.get(plan_method, plan_method)


def layer_entry(choice) -> dict:
    """A plan JSON's entry for one linear: ``{"bits", "group_size"}``, plus ``"type"`` for a llama.cpp type (its level
    bits and block as ``bits`` / ``group_size``)."""
    if isinstance(choice, str):
        return {"bits": _llamacpp.nominal_bits(choice), "group_size": _llamacpp.block_size(choice), "type": choice}
    b, g = choice
    return {"bits": int(b), "group_size": int(g)}


def entry_choice(entry: Mapping):
    """The setting a plan JSON entry names (``layer_entry`` read back)."""
    return str(entry["type"]) if entry.get("type") else (int(entry["bits"]), int(entry["group_size"]))


# ------------------------------------------------------------------------------------------------
# regexes that match exactly a set of module names
# ------------------------------------------------------------------------------------------------
_BLOCK = re.compile(r"^(.*?)\.(\d+)\.(.*)$")


def names_regex(names: Sequence[str]) -> list[str]:
    """Anchored regexes (``^...$``), one per distinct ``prefix.<N>.rest`` shape, that match exactly ``names``.

    ``model.layers.3.self_attn.q_proj`` and ``model.layers.17.self_attn.q_proj`` become
    ``^model\\.layers\\.(?:3|17)\\.self_attn\\.q_proj$``.
    """
    shapes: dict[tuple[str, str], list[int]] = defaultdict(list)
    plain: list[str] = []
    for n in names:
        m = _BLOCK.match(n)
        if m:
            shapes[(m.group(1), m.group(3))].append(int(m.group(2)))
        else:
            plain.append(n)
    out = []
    for (pre, rest), blocks in shapes.items():
        alt = "|".join(str(b) for b in sorted(set(blocks)))
        out.append(f"^{re.escape(pre)}\\.(?:{alt})\\.{re.escape(rest)}$")
    out += [f"^{re.escape(n)}$" for n in plain]
    return out


def matched(patterns: Iterable[str], universe: Iterable[str]) -> set[str]:
    """Names of ``universe`` that ``re.match`` any of ``patterns`` (compressed-tensors' and GPTQModel's rule)."""
    comp = [re.compile(p) for p in patterns]
    return {u for u in universe if any(c.match(u) for c in comp)}


def _universe(plan: BitPlan, module_names: Iterable[str] | None) -> list[str]:
    return list(module_names) if module_names is not None else list(plan.layers)


def _require_exact(label: str, got: set[str], want: set[str]) -> None:
    if got != want:
        extra, missing = sorted(got - want), sorted(want - got)
        raise ExportError(f"{label} does not match exactly its linears (extra: {extra[:3]}, missing: {missing[:3]})")


# ------------------------------------------------------------------------------------------------
# JSON
# ------------------------------------------------------------------------------------------------
def _floats(values: Mapping[str, float]) -> dict[str, float]:
    return {k: float(v) for k, v in values.items()}


def plan_dict(plan: BitPlan, report: PlanReport | None = None) -> dict:
    """The JSON export: the plan, its figures on the test tokens (``measured``) and the selection tokens, and with
    ``report`` the best uniform configuration's figures and the three token sets."""
    d = {"model": plan.model, "budget_bits": plan.budget_bits, "method": plan.method,
         "zero_point": plan.zero_point, "avg_bits": plan.avg_bits, "exact": plan.exact, "source": plan.source,
         "layers": {n: layer_entry(c) for n, c in plan.layers.items()},
         "measured": _floats(plan.measured), "measured_on": "test", "selection": _floats(plan.selection)}
    if report is not None:
        b = report.baseline
        d["baseline"] = None if b is None else {"variant": b.source, "avg_bits": b.avg_bits,
                                                "measured": _floats(b.measured), "selection": _floats(b.selection)}
        d["token_sets"] = list(report.tokens)
        d["definitions"] = {k: v for k, v in DEFINITIONS.items() if k in d["measured"] or k == "protocol"}
    return d


def validate_json(d: dict, plan: BitPlan) -> None:
    for key in ("model", "budget_bits", "method", "layers", "measured", "measured_on"):
        if key not in d:
            raise ExportError(f"the JSON plan lacks its {key!r} entry")
    got = {n: entry_choice(v) for n, v in d["layers"].items()}
    if got != {n: entry_choice(layer_entry(c)) for n, c in plan.layers.items()}:
        raise ExportError("the JSON plan read back differs from the plan")


# ------------------------------------------------------------------------------------------------
# llm-compressor
# ------------------------------------------------------------------------------------------------
def _scheme(bits: int, group_size: int, zero_point: bool) -> dict:
    if int(group_size) <= 0:  # one group per row: compressed-tensors' per-channel strategy
        return {"num_bits": int(bits), "type": "int", "symmetric": not zero_point, "strategy": "channel"}
    return {"num_bits": int(bits), "type": "int", "symmetric": not zero_point, "strategy": "group",
            "group_size": int(group_size)}


def by_setting(plan: BitPlan) -> dict[tuple[int, int], list[str]]:
    """The plan's quantized linears per ``(bits, group size)``, settings sorted."""
    if plan.in_types:
        raise ExportError("a plan in llama.cpp types is written as a GGUF (or llama.cpp arguments); llm-compressor "
                          "and GPTQModel store the integer grid: plan with bits and group sizes for them")
    out: dict[tuple[int, int], list[str]] = defaultdict(list)
    for n, (b, g) in plan.layers.items():
        if b != 16:
            out[(int(b), int(g))].append(n)
    return dict(sorted(out.items()))


def llmcompressor_recipe(plan: BitPlan) -> dict:
    """The recipe as a dict (``quant_stage: quant_modifiers: {...}``) for the plan's method."""
    groups = {}
    for i, ((b, g), names) in enumerate(by_setting(plan).items()):
        groups[f"group_{i}"] = {"targets": ["re:" + p for p in names_regex(names)],
                                "weights": _scheme(b, g, plan.zero_point)}
    fp = [n for n, (b, _) in plan.layers.items() if b == 16]
    ignore = ["lm_head"] + ["re:" + p for p in names_regex(fp)] if fp else ["lm_head"]
    body = {"ignore": ignore, "config_groups": groups}
    method = (plan.method or "rtn").lower()
    if method.startswith("gptq"):
        from ..methods.gptq import GPTQOptions

        # the explorer's GPTQ settings, stated: llm-compressor 0.14 would otherwise order columns by activation
        # (its default actorder "static"); the explorer's default runs the columns in order
        o = GPTQOptions()
        mods = {"GPTQModifier": {**body, "actorder": "static" if o.act_order else None,
                                 "dampening_frac": o.percdamp, "block_size": o.block_size}}
    elif method.startswith("awq"):
        # AWQModifier searches the smoothing scales; the QuantizationModifier after it quantizes (which linears are
        # quantized is its business: llm-compressor 0.14's AWQModifier forbids an `ignore` key). duo_scaling off:
        # the explorer's search is llm-awq's (s = mean|x|^alpha, no weight term; llm-compressor's default is on)
        mods = {"AWQModifier": {"duo_scaling": False}, "QuantizationModifier": body}
    else:
        mods = {"QuantizationModifier": body}
    return {"quant_stage": {"quant_modifiers": mods}}


def validate_recipe(d: dict, plan: BitPlan, module_names: Iterable[str] | None = None) -> None:
    """Each config group's targets match exactly the plan's linears at its width (and ignore the fp16 ones)."""
    universe = _universe(plan, module_names)
    try:
        mods = d["quant_stage"]["quant_modifiers"]
    except (KeyError, TypeError):
        raise ExportError("the recipe lacks quant_stage.quant_modifiers") from None
    body = mods.get("GPTQModifier") or mods.get("QuantizationModifier")
    if body is None:
        raise ExportError("the recipe has neither a GPTQModifier nor a QuantizationModifier")
    ign = [i[3:] for i in body.get("ignore", []) if i.startswith("re:")]
    ignored = matched(ign, universe)
    _require_exact("the recipe's ignore list", ignored, set(plan.names_at(16)))
    covered: set[str] = set()
    for gname, grp in body.get("config_groups", {}).items():
        w = grp["weights"]
        g_of = int(w["group_size"]) if w.get("strategy") == "group" else 0
        want = {n for n, (b, g) in plan.layers.items() if b == w["num_bits"] and g == g_of and b != 16}
        got = matched([t[3:] for t in grp["targets"]], universe) - ignored
        _require_exact(f"config group {gname}", got, want)
        if got & covered:
            raise ExportError(f"config group {gname} overlaps another group")
        covered |= got
    _require_exact("the recipe", covered | ignored, set(plan.layers))


# ------------------------------------------------------------------------------------------------
# GPTQModel
# ------------------------------------------------------------------------------------------------
def gptqmodel_dynamic(plan: BitPlan) -> dict:
    """``{"-:regex": {}, "+:regex": {"bits", "group_size"}}``; skips first so a skipped module is never quantized."""
    out: dict[str, dict] = {}
    for p in names_regex(plan.names_at(16)):
        out["-:" + p] = {}
    for (b, g), names in by_setting(plan).items():
        for p in names_regex(names):
            out["+:" + p] = {"bits": b, "group_size": g if g > 0 else -1}
    return out


def dynamic_lookup(dynamic: Mapping[str, Mapping], name: str) -> dict | bool | None:
    """GPTQModel's rule: the first key whose regex ``re.match``-es ``name``; ``False`` for ``-:`` (skip)."""
    for key, override in dynamic.items():
        if key.startswith("-:"):
            if re.match(key[2:], name):
                return False
        elif re.match(key.removeprefix("+:"), name):
            return dict(override)
    return None


def validate_dynamic(d: Mapping[str, Mapping], plan: BitPlan, module_names: Iterable[str] | None = None) -> None:
    for n in _universe(plan, module_names):
        got = dynamic_lookup(d, n)
        if n not in plan.layers:
            if got not in (None, False):
                raise ExportError(f"the dynamic dict matches {n}, which is not in the plan")
            continue
        b, g = plan.layers[n]
        want = False if b == 16 else {"bits": int(b), "group_size": int(g) if g > 0 else -1}
        if got != want:
            raise ExportError(f"the dynamic dict gives {n} {got!r}, the plan says {want!r}")


# ------------------------------------------------------------------------------------------------
# llama.cpp
# ------------------------------------------------------------------------------------------------
def gguf_type(bits: int, row_len: int, zero_point: bool = True) -> str:
    """Nearest GGUF type for ``bits`` on rows of ``row_len`` weights (k-quants need multiples of 256)."""
    if row_len % QK_K == 0:
        return K_QUANT[int(bits)]
    return (BLOCK32_ZP if zero_point else BLOCK32)[int(bits)]


def gguf_tensor_name(block: int, family: str) -> str:
    t = GGUF_TENSOR.get(family)
    if t is None:
        raise ExportError(f"no GGUF tensor name for a {family!r} linear; the llama.cpp export needs a Llama-like model")
    return f"blk.{int(block)}.{t}"


def llamacpp_args(plan: BitPlan, linears: Sequence[Mapping]) -> list[str]:
    """``["--tensor-type", "blk.0.attn_q=Q4_K", ...]`` for each linear (``linears``: name, block, family,
    in_features rows, e.g. ``Analysis.linears`` records)."""
    out: list[str] = []
    for li in linears:
        n = li["name"]
        if n not in plan.layers:
            continue
        c = plan.layers[n]
        t = c if isinstance(c, str) else gguf_type(int(c[0]), int(li["in_features"]), plan.zero_point)
        out += ["--tensor-type", f"{gguf_tensor_name(int(li['block']), str(li['family']))}={t}"]
    return out


def validate_llamacpp(args: Sequence[str], plan: BitPlan, linears: Sequence[Mapping],
                      gguf_names: Iterable[str] | None = None) -> None:
    """Each argument names exactly one tensor (``re.search``, as llama-quantize's ``std::regex_search``) and
    the right one; with ``gguf_names`` (a GGUF file's tensor names) every name must exist there."""
    import gguf

    pairs = [a.split("=", 1) for a in args[1::2]]
    if args[0::2] != ["--tensor-type"] * len(pairs) or any(len(p) != 2 for p in pairs):
        raise ExportError("the llama.cpp arguments are not --tensor-type NAME=TYPE pairs")
    want = {gguf_tensor_name(int(li["block"]), str(li["family"])) + ".weight": li["name"]
            for li in linears if li["name"] in plan.layers}
    names = set(gguf_names) if gguf_names is not None else set(want)
    missing = sorted(set(want) - names)
    if missing:
        raise ExportError(f"the GGUF file has no tensor {missing[0]}")
    types = set(gguf.GGMLQuantizationType.__members__)
    seen = set()
    for tname, ttype in pairs:
        if ttype not in types:
            raise ExportError(f"{ttype} is not a GGUF tensor type")
        hits = {n for n in names if re.search(tname, n)}
        if len(hits) != 1 or next(iter(hits)) not in want:
            raise ExportError(f"--tensor-type {tname} matches {sorted(hits)[:3]}, not exactly its one tensor")
        seen |= hits
    if seen != set(want):
        raise ExportError("the llama.cpp arguments do not cover every planned linear")


# ------------------------------------------------------------------------------------------------
# write + re-read
# ------------------------------------------------------------------------------------------------
def _write(path: Path, text: str) -> None:
    try:
        store.atomic_write_bytes(path, text.encode("utf-8"))
    except OSError as e:
        raise ExportError(f"cannot write {str(path)!r} ({e.strerror})") from None


def recipe_header(plan: BitPlan) -> str:
    """YAML comment lines with the plan's test figures (a recipe has no field for them)."""
    figs = ", ".join(f"{k} {v:.4g}" for k, v in plan.measured.items() if k in ("kl", "kl_se", "perplexity", "same_top"))
    return (f"# {plan.model}: {plan.avg_bits:.4f} bits per weight ({plan.source}); on the test tokens: {figs or 'not scored'}\n"
            if plan.model or figs else "")


def write_exports(plan: BitPlan, out_dir: str | Path, formats: Iterable[str], *, linears: Sequence[Mapping],
                  module_names: Iterable[str] | None = None, gguf_names: Iterable[str] | None = None,
                  report: PlanReport | None = None) -> dict[str, Path]:
    """Write each format atomically into ``out_dir``, read it back and validate it; ``{format: path}``.

    ``linears``: records with name, block, family, in_features (the analysis' ``linears`` table);
    ``module_names``: every module name of the model (the regexes must not catch anything else); ``report``: the
    ``PlanReport`` whose baseline and token sets the JSON carries.
    """
    formats = check_formats(formats)
    refused = [f for f in formats if f not in formats_for(plan)]
    if refused:  # before anything is written
        raise ExportError(f"a plan in llama.cpp types is written as {' or '.join(TYPE_FORMATS)} (and as a GGUF), not "
                          f"{refused[0]}: that format stores the integer grid; plan with bits and group sizes for it")
    out = Path(out_dir).expanduser()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ExportError(f"cannot create the output folder {str(out)!r} ({e.strerror})") from None
    module_names = list(module_names) if module_names is not None else None
    written: dict[str, Path] = {}
    for f in formats:
        p = out / FILE_NAMES[f]
        if f == "json":
            _write(p, json.dumps(plan_dict(plan, report), indent=1))
            validate_json(json.loads(p.read_text()), plan)
        elif f == "llmcompressor":
            _write(p, recipe_header(plan) + yaml.safe_dump(llmcompressor_recipe(plan), sort_keys=False, width=1 << 16))
            validate_recipe(yaml.safe_load(p.read_text()), plan, module_names)
        elif f == "gptqmodel":
            _write(p, json.dumps(gptqmodel_dynamic(plan), indent=1))
            validate_dynamic(json.loads(p.read_text()), plan, module_names)
        else:
            args = llamacpp_args(plan, linears)
            _write(p, " ".join(args) + "\n")
            validate_llamacpp(p.read_text().split(), plan, linears, gguf_names)
        written[f] = p
    return written
