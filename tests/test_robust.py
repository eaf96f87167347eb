"""Issue 6: bad input ends in one readable sentence, the cache survives kills and races, sessions don't mix."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from conftest import ROOT, build_tiny, tiny_settings
from core.model import store
from core.analysis import AnalysisSettings, analyze, list_cached
from core.model.models import load_model
from test_engine import _hook_count, run_cli


@pytest.fixture(scope="module")
def bad_models(tmp_path_factory, tiny_dir):
    """Folders that are broken in the ways people's downloads are."""
    import transformers as tf

    d = tmp_path_factory.mktemp("bad")
    good = Path(tiny_dir("llama"))
    out = {}
    (d / "empty").mkdir()
    out["empty"] = d / "empty"
    shutil.copytree(good, d / "noweights")
    (d / "noweights" / "model.safetensors").unlink()
    out["noweights"] = d / "noweights"
    shutil.copytree(good, d / "corrupt")
    f = d / "corrupt" / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    out["corrupt"] = d / "corrupt"
    shutil.copytree(good, d / "unknown")
    cfg = json.loads((d / "unknown" / "config.json").read_text())
    cfg["model_type"] = "frobnicator"
    (d / "unknown" / "config.json").write_text(json.dumps(cfg))
    out["unknown"] = d / "unknown"
    tf.ResNetModel(tf.ResNetConfig(embedding_size=8, hidden_sizes=[8, 8], depths=[1, 1])).save_pretrained(d / "nolinear")
    out["nolinear"] = d / "nolinear"
    shutil.copytree(good, d / "pickle")
    (d / "pickle" / "model.safetensors").rename(d / "pickle" / "pytorch_model.bin")
    out["pickle"] = d / "pickle"
    m = build_tiny("llama")
    m.model.layers[0].mlp.down_proj.weight.data[0, 0] = float("nan")
    m.save_pretrained(d / "nanweights")
    out["nanweights"] = d / "nanweights"
    m = build_tiny("llama")
    m.model.layers[1].mlp.up_proj.weight.data *= 2e5  # weights fit float16, their products overflow it
    m.save_pretrained(d / "overflow16")
    out["overflow16"] = d / "overflow16"
    return out


@pytest.mark.parametrize("case,needle", [
    ("empty", "no config.json"),
    ("noweights", "no .safetensors weights"),
    ("corrupt", "corrupt or truncated"),
    ("unknown", "unknown or unsupported model type 'frobnicator'"),
    ("nolinear", "no transformer blocks with linear layers"),
    ("pickle", "safetensors only"),
    ("nanweights", "NaN or inf (in model.layers.0.mlp.down_proj.weight)"),
])
def test_cli_bad_model_folders(bad_models, tokenizer_dir, tmp_path, case, needle):
    r = run_cli("analyze", "--model", str(bad_models[case]), "--tokenizer", tokenizer_dir, "--cache-dir",
                str(tmp_path), "--quiet", "--n-samples", "2", "--seqlen", "32", "--group-size", "32")
    assert r.returncode == 2, r.stdout
    assert "Traceback" not in r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and needle in last, last
    assert not any(tmp_path.iterdir()) or not list_cached(tmp_path)  # nothing half-written


def test_cli_hub_id_offline_is_clear(tmp_path):
    # the reachability probe answers first, so huggingface_hub's retry loop never starts (no timing asserted here)
    r = run_cli("analyze", "--model", "someorg/no-such-model", "--cache-dir", str(tmp_path), "--quiet")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "unreachable" in r.stderr.strip().splitlines()[-1]


def test_fp16_overflow_names_the_layer(bad_models, tokenizer_dir, tmp_path):
    r = run_cli("analyze", "--model", str(bad_models["overflow16"]), "--tokenizer", tokenizer_dir, "--dtype",
                "float16", "--cache-dir", str(tmp_path), "--quiet", "--n-samples", "2", "--seqlen", "32",
                "--group-size", "32", "--bits", "4")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert "NaN or inf in the activations entering model.layers.1.mlp.down_proj" in last and "float16" in last
    assert not list_cached(tmp_path)


@pytest.mark.parametrize("content,needle", [
    (b"", "empty"),
    (b"   \n\n  ", "empty"),
    (b"a few words only", "too short"),
    (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)) * 4, "binary"),
    (b"caf\xe9 latin-1 text " * 50, "not UTF-8"),
])
def test_cli_bad_calibration_files(tmp_path, content, needle):
    f = tmp_path / "calib.txt"
    f.write_bytes(content)
    r = run_cli("analyze", "--calib-file", str(f), "--cache-dir", str(tmp_path / "c"), "--quiet", "--bits", "4",
                "--seqlen", "64", "--n-samples", "2")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and needle in last, last


def test_oversized_text_is_refused(tmp_path, monkeypatch):
    from core.model import calibration

    monkeypatch.setattr(calibration, "MAX_TEXT_BYTES", 1000)
    f = tmp_path / "big.txt"
    f.write_text("word " * 1000)
    with pytest.raises(calibration.CalibrationError, match="the limit is"):
        calibration.read_text_file(f)


def test_read_only_cache_dir(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    r = run_cli("analyze", "--cache-dir", str(blocker / "cache"), "--quiet", "--bits", "4")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "is not writable" in r.stderr.strip().splitlines()[-1]


def test_read_only_cache_still_reopens(tiny_dir, tokenizer_dir, tmp_path):
    """An existing entry is read without writing anything (e.g. a cache shipped on a read-only share)."""
    s = tiny_settings(tiny_dir("llama"), tokenizer_dir)
    a = analyze(s, tmp_path)
    before = sorted(p.name for p in a.path.iterdir())
    os.chmod(a.path, 0o555)
    try:
        b = analyze(s, tmp_path)
        assert b.path == a.path and b._lm is None
        assert sorted(p.name for p in a.path.iterdir()) == before
    finally:
        os.chmod(a.path, 0o755)


WRITER = r"""
import sys, hashlib
sys.path.insert(0, {root!r})
from pathlib import Path
from core.model import store
p = Path({path!r})
i = 0
while True:
    i += 1
    body = (f"version {{i}} ".encode() * 2_000_000)
    store.atomic_write_bytes(p, hashlib.sha256(body).hexdigest().encode() + b"\n" + body)
    print(i, flush=True)
"""


def _valid(path: Path) -> bool:
    import hashlib

    data = path.read_bytes()
    digest, _, body = data.partition(b"\n")
    return hashlib.sha256(body).hexdigest().encode() == digest


def test_killed_writer_leaves_previous_valid_state(tmp_path):
    target = tmp_path / "table.bin"
    proc = subprocess.Popen([sys.executable, "-c", WRITER.format(root=str(ROOT), path=str(target))],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "1"  # one complete version exists
        time.sleep(0.15)  # now it is somewhere inside writing a later version
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert _valid(target)
    # leftovers are hidden temp files only, never the target name half-written
    assert all(p.name.startswith(".table.bin.") for p in tmp_path.iterdir() if p != target)


def test_killed_analysis_leaves_no_entry_then_recovers(tiny_dir, tokenizer_dir, tmp_path):
    code = (f"import sys; sys.path[:0] = [{str(ROOT / 'tests')!r}, {str(ROOT)!r}]\n"
            "from conftest import tiny_settings\nfrom core.analysis import analyze\nimport os, signal\n"
            f"s = tiny_settings({tiny_dir('llama')!r}, {tokenizer_dir!r})\n"
            "def p(f, m):\n    if m == 'writing cache': os.kill(os.getpid(), signal.SIGKILL)\n"
            f"analyze(s, {str(tmp_path)!r}, progress=p)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=300)
    assert r.returncode == -signal.SIGKILL
    assert list_cached(tmp_path) == []
    a = analyze(tiny_settings(tiny_dir("llama"), tokenizer_dir), tmp_path)
    assert len(list_cached(tmp_path)) == 1 and store.read_manifest(a.path) is not None


def test_missing_file_is_recomputed(tiny_dir, tokenizer_dir, tmp_path):
    s = tiny_settings(tiny_dir("llama"), tokenizer_dir)
    a = analyze(s, tmp_path)
    (a.path / "curves.parquet").unlink()
    assert store.read_manifest(a.path) is None and list_cached(tmp_path) == []
    b = analyze(s, tmp_path)
    assert b.curves.equals(a.curves)


def test_two_processes_same_entry(tiny_dir, tokenizer_dir, tmp_path):
    args = ["analyze", "--model", tiny_dir("qwen2"), "--tokenizer", tokenizer_dir, "--cache-dir", str(tmp_path),
            "--quiet", "--n-samples", "4", "--seqlen", "64", "--group-size", "32", "--bits", "3,4"]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    procs = [subprocess.Popen([sys.executable, "-m", "core", *args], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    entries = list_cached(tmp_path)
    assert len(entries) == 1
    model_dir = Path(entries[0]["path"]).parent
    assert [p.name for p in model_dir.iterdir()] == [Path(entries[0]["path"]).name]  # no temp leftovers
    assert store.read_manifest(Path(entries[0]["path"])) is not None


def test_concurrent_analyses_on_one_model_match_serial(tiny_dir, tokenizer_dir, tmp_path):
    s = tiny_settings(tiny_dir("llama"), tokenizer_dir)
    lm = load_model(s.model, tokenizer_source=tokenizer_dir)
    hooks = _hook_count(lm.model)
    serial = [analyze(s, tmp_path / f"serial{i}", lm=lm) for i in range(2)]
    results: dict[int, object] = {}
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            results[i] = analyze(s, tmp_path / f"conc{i}", lm=lm)
        except BaseException as e:  # noqa: BLE001
            errors.append(e)
    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    assert not errors
    for i in range(2):
        for t in ("channels", "layers", "curves"):
            assert results[i].tables[t].equals(serial[0].tables[t]), t
        for k, v in serial[0].samples().items():
            assert torch.equal(results[i].samples()[k], v)
    assert _hook_count(lm.model) == hooks


def test_trust_remote_code_is_off_by_default(monkeypatch, tiny_dir, tokenizer_dir):
    assert AnalysisSettings().trust_remote_code is False
    from core.cli import build_parser

    assert build_parser().parse_args(["analyze"]).trust_remote_code is False
    import transformers

    seen = []
    real = transformers.AutoConfig.from_pretrained

    def spy(*a, **kw):
        seen.append(kw.get("trust_remote_code"))
        return real(*a, **kw)
    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", spy)
    load_model(tiny_dir("llama"), tokenizer_source=tokenizer_dir)
    assert seen and all(v is False for v in seen)


def test_streamlit_config_is_safe():
    import tomllib

    cfg = tomllib.loads((ROOT / ".streamlit" / "config.toml").read_text())
    assert cfg["server"]["address"] in ("localhost", "127.0.0.1")
    assert 1 <= cfg["server"]["maxUploadSize"] <= 200
    assert cfg["server"]["fileWatcherType"] == "none"
    assert cfg["browser"]["gatherUsageStats"] is False


def test_nothing_is_unpickled():
    """No code path reads pickles back: no pickle/torch.load/read_pickle/allow_pickle anywhere in the app."""
    bad = ("import pickle", "torch.load(", "read_pickle(", "allow_pickle=True", "joblib.load", "cloudpickle")
    files = list((ROOT / "core").rglob("*.py")) + list((ROOT / "pages").rglob("*.py")) + \
        [p for p in ROOT.glob("*.py")]
    for f in files:
        text = f.read_text()
        for b in bad:
            assert b not in text, f"{f.name} uses {b}"
    # loading goes through safetensors only
    assert "use_safetensors=True" in (ROOT / "core" / "model" / "models.py").read_text()


def test_cache_slug_for_hostile_ids(tmp_path):
    for bad in ("../../../etc/passwd", "/etc", "..\\..\\x", "a/./../../b", "\x00evil"):
        p = store.entry_path(tmp_path, bad, "0123")
        assert tmp_path.resolve() in p.parents
        assert ".." not in p.relative_to(tmp_path.resolve()).parts


def test_layer_lab_never_sees_weights_a_quality_run_rewrote(tiny_dir, tokenizer_dir, tmp_path):
    """A model-quality run rewrites the shared model's weights in place; another session reading a layer
    meanwhile must get the original weights (it waits for the lock), never the quantized ones."""
    from core.analysis import open_entry
    from core.model.collect import model_lock
    from core.model.linears import set_linear_weight
    from core.studies.evaluate import run_quality

    s = tiny_settings(tiny_dir("llama"), tokenizer_dir)
    lm = load_model(s.model, tokenizer_source=tokenizer_dir)
    a = analyze(s, tmp_path, lm=lm)
    name = a.names[3]
    original = lm.weight(name).clone()

    started, done = threading.Event(), threading.Event()

    def rewriter() -> None:  # what a quality run does, made slow and deterministic
        with model_lock(lm.model):
            m = lm.model.get_submodule(name)
            set_linear_weight(m, original * 2)  # streamed: written as the value the block is read with
            assert torch.equal(lm.weight(name), original * 2)
            started.set()
            time.sleep(0.5)
            set_linear_weight(m, original)
        done.set()
    t = threading.Thread(target=rewriter)
    t.start()
    started.wait(10)
    other_session = open_entry(a.path, lm)  # fresh memo: must read the live model
    seen = other_session.weight(name)
    assert done.is_set() and torch.equal(seen, original)
    t.join()

    # and with a real evaluation running in another thread
    errors: list[BaseException] = []
    th = threading.Thread(target=lambda: run_quality(a, modes=["rtn", "awq"], bits=[2], group_size=32))
    th.start()
    while th.is_alive():
        fresh = open_entry(a.path, lm)
        if not torch.equal(fresh.weight(name), original):
            errors.append(AssertionError("saw rewritten weights"))
        time.sleep(0.01)
    th.join()
    assert not errors
    assert torch.equal(lm.weight(name), original)


def test_entries_written_within_one_second_are_listed_newest_first(tmp_path, monkeypatch):
    import pandas as pd

    monkeypatch.setattr(store.time, "strftime", lambda fmt, *a: "2026-11-29T10:00:00")  # one second for all
    names = ["ffff", "aaaa", "cccc"]  # written in this order; their folder names sort otherwise
    for n in names:
        store.write_entry(tmp_path / "m" / n, {"model_id": n}, {"t": pd.DataFrame({"x": [1]})}, {})
    assert [m["model_id"] for m in store.list_entries(tmp_path)] == names[::-1]


def test_kept_samples_read_key_by_key_and_damaged_file_refused(tmp_path):
    """An entry's samples.safetensors is opened as a mapping read key by key (a large model's kept inputs are
    hundreds of MB, never all in memory at once): same tensors as the file holds; a truncated file, in its data or
    its header, is refused with CacheError at open, and a missing key is a KeyError."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    t = {"calib/a": torch.randn(8, 16, generator=g), "heldout/a": torch.randn(4, 16, generator=g)}
    save_file(t, str(tmp_path / store.SAMPLES))
    m = store.load_samples(tmp_path)
    assert sorted(m) == sorted(t) and len(m) == 2
    assert all(torch.equal(m[k], v) for k, v in t.items())
    assert m["calib/a"] is not m["calib/a"]  # read afresh: nothing kept
    with pytest.raises(KeyError):
        m["calib/missing"]
    data = (tmp_path / store.SAMPLES).read_bytes()
    for cut in (data[:-100], data[:20]):
        (tmp_path / store.SAMPLES).write_bytes(cut)
        with pytest.raises(store.CacheError, match="cached input sample is unreadable"):
            store.load_samples(tmp_path)


def test_atomic_writes_get_ordinary_permissions(tmp_path):
    """store.atomic_write_bytes (plan exports, tables, manifests) gives the file 0666 less the umask, not
    mkstemp's private 0600."""
    mask = os.umask(0o027)
    try:
        store.atomic_write_bytes(tmp_path / "a.txt", b"x")
        assert (tmp_path / "a.txt").stat().st_mode & 0o777 == 0o640
        assert (tmp_path / "a.txt").read_bytes() == b"x"
    finally:
        os.umask(mask)
