"""First open of the app (issue 9): the bundled SmolLM2 on an empty cache, then the reopen.

``bench_first_open(workdir, core_root)`` -> dict (merged into bench/run.py's JSON, figure ``first_open``);
``report_first_open`` prints its lines. Self-contained: its own cache under ``workdir``, removed afterwards.

What it times: ``python -m core analyze`` with exactly the app's first-open settings (``AnalysisSettings()``:
SmolLM2 converted from its bundled GGUF, then analyzed) in a fresh process on an empty cache, then the same
command again (a cache hit). ``first_open_s``: the first process's wall time (imports, conversion, analysis);
``first_reopen_s``: the time inside ``analyze`` of the second (what the app waits for on reopening;
``first_reopen_process_s`` adds the imports). ``first_open_cpu_s``: the first process's CPU seconds: on a
machine shared with other work, CPU seconds / threads is roughly what the wall time would be on idle cores.
"""
from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path


def bench_first_open(workdir: Path, core_root: Path) -> dict:
    from core.analysis import AnalysisSettings
    from core.model.gguf_file import MANIFEST, MODELS_DIR

    d = AnalysisSettings()
    cache = Path(workdir) / "first_open_cache"
    shutil.rmtree(cache, ignore_errors=True)
    cmd = [sys.executable, "-m", "core", "analyze", "--model", d.model, "--cache-dir", str(cache), "--quiet",
           "--bits", ",".join(map(str, d.sweep.bits)), "--group-size", str(d.sweep.group_size),
           "--n-samples", str(d.calibration.n_samples), "--seqlen", str(d.calibration.seqlen),
           "--heldout-samples", str(d.calibration.heldout_samples), "--sample-rows", str(d.sample_rows)]
    walls, inside, cpu, load = [], [], [], []
    try:
        for _ in range(2):  # empty cache, then the cache hit
            load.append(os.getloadavg()[0])
            r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
            t0 = time.perf_counter()
            p = subprocess.run(cmd, cwd=str(core_root), capture_output=True, text=True,
                               env={**os.environ, "PYTHONPATH": str(core_root)})
            walls.append(time.perf_counter() - t0)
            r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
            cpu.append(r1.ru_utime + r1.ru_stime - r0.ru_utime - r0.ru_stime)
            if p.returncode:
                raise SystemExit(f"first open failed ({p.returncode}): {p.stderr.strip()[-500:]}")
            inside += [float(ln.rsplit("time", 1)[1].strip().rstrip("s")) for ln in p.stdout.splitlines()
                       if ln.startswith("linears") and "time " in ln]
            print(f"first_open run: {walls[-1]:.1f} s wall, {inside[-1]:.2f} s inside analyze, {cpu[-1]:.0f} s CPU",
                  file=sys.stderr, flush=True)
        conv = next((cache / MODELS_DIR).glob(f"*/{MANIFEST}"), None)
        convert_s = json.loads(conv.read_text())["seconds"] if conv else None
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    return {
        "first_open_command": "python -m core analyze " + " ".join(cmd[5:]),
        "first_open_s": walls[0], "first_open_inside_analyze_s": inside[0], "first_open_convert_s": convert_s,
        "first_open_cpu_s": cpu[0], "first_reopen_s": inside[1], "first_reopen_process_s": walls[1],
        "first_open_loadavg": load[0], "first_reopen_loadavg": load[1],
    }


def report_first_open(res: dict, row) -> None:
    row("first_open_s (SmolLM2, empty cache)", f"{res['first_open_s']:.1f}",
        f"conversion {res['first_open_convert_s']:.1f} s, analyze {res['first_open_inside_analyze_s']:.1f} s, "
        f"{res['first_open_cpu_s']:.0f} CPU s, load {res['first_open_loadavg']:.1f}; target <= 90 s")
    row("first_reopen_s (cache hit)", f"{res['first_reopen_s']:.2f}",
        f"process with imports {res['first_reopen_process_s']:.1f} s; target <= 2 s")
