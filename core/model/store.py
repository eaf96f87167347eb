"""The parquet cache: ``<cache_dir>/<model-slug>/<settings-hash>/``.

Every file is written atomically (temp file in the same folder + ``os.replace``); a whole entry is
built in a temp folder and renamed into place, so readers see either nothing or a complete entry.
``manifest.json`` lists each file with its size and sha256; an entry whose files do not match, or
whose schema differs, is treated as missing (and recomputed by the caller). Nothing is unpickled:
tables are parquet, tensors safetensors, metadata JSON.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pandas as pd
import torch

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
TABLES = ("linears", "channels", "layers", "curves", "importance")
SAMPLES = "samples.safetensors"
# X^T X per distinct input (GPTQ's Hessian), float32, packed upper triangle: optional, large, read one at a time
HESSIANS = "hessians.safetensors"
UNVERIFIED = (SAMPLES, HESSIANS)  # large tensor files: size-checked on open, not hashed (safetensors checks headers)


class CacheError(RuntimeError):
    pass


def slugify(model_id: str) -> str:
    """A folder name for a model id that cannot escape the cache dir (no ``/``, ``..`` or absolute paths)."""
    s = re.sub(r"[^A-Za-z0-9._-]+", "--", str(model_id)).strip(".-")
    s = re.sub(r"\.{2,}", ".", s)[-80:].strip(".-")
    if s != str(model_id):
        # changed or shortened ids (``org/name``, paths): keep them distinct with a short hash of the full id
        s = f"{s}-{hashlib.sha256(str(model_id).encode()).hexdigest()[:8]}"
    return s or "model"


def settings_hash(settings: dict[str, Any]) -> str:
    blob = json.dumps({"schema": SCHEMA_VERSION, **settings}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def entry_path(cache_dir: str | Path, model_id: str, key: str) -> Path:
    root = Path(cache_dir).expanduser().resolve()
    p = (root / slugify(model_id) / key).resolve()
    if root not in p.parents:
        raise CacheError(f"cache path for {model_id!r} escapes the cache directory")
    return p


def sha256_file(path: Path) -> str:
    """The hex sha256 of a file, read in 4 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _umask() -> int:
    try:  # Linux: read it without changing it (os.umask sets it, for every thread, while it reads)
        with open("/proc/self/status") as f:
            return next(int(line.split()[1], 8) for line in f if line.startswith("Umask:"))
    except (OSError, StopIteration, ValueError, IndexError):
        mask = os.umask(0o022)
        os.umask(mask)
        return mask


def make_ordinary(path: Path) -> None:
    """Give ``path`` (a file, or a folder and everything in it) the permissions a newly created file or folder
    gets (``0666`` / ``0777`` less the umask): ``mkstemp`` / ``mkdtemp`` and safetensors make them private (0600),
    which a runtime under another account (a vLLM container) cannot read."""
    mask = _umask()
    if path.is_dir():
        for root, dirs, files in os.walk(path):
            for d in dirs:
                os.chmod(os.path.join(root, d), 0o777 & ~mask)
            for f in files:
                os.chmod(os.path.join(root, f), 0o666 & ~mask)
        os.chmod(path, 0o777 & ~mask)
    else:
        os.chmod(path, 0o666 & ~mask)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        make_ordinary(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def write_table(path: Path, df: pd.DataFrame) -> None:
    import io

    buf = io.BytesIO()
    df.to_parquet(buf, index=False)
    atomic_write_bytes(path, buf.getvalue())


def read_table(path: Path) -> pd.DataFrame:
    try:
        return pd.read_parquet(path)
    except Exception as e:  # noqa: BLE001
        raise CacheError(f"cache table {path.name} is unreadable ({type(e).__name__})") from e


def check_writable(cache_dir: str | Path) -> Path:
    root = Path(cache_dir).expanduser()
    try:
        root.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=root, prefix=".probe.")
        os.close(fd)
        os.unlink(tmp)
    except OSError as e:
        raise CacheError(f"cache directory {str(root)!r} is not writable ({e.strerror or e})") from e
    return root


def write_entry(
    path: Path,
    manifest: dict[str, Any],
    tables: dict[str, pd.DataFrame],
    tensors: dict[str, torch.Tensor] | None = None,
    tensor_files: dict[str, dict[str, torch.Tensor]] | None = None,
) -> Path:
    """Write a complete entry at ``path``; if another process finished the same entry first, keep theirs.

    ``tensors`` go to ``samples.safetensors``; ``tensor_files`` maps further safetensors file names (e.g.
    ``HESSIANS``) to their tensors."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        files: dict[str, dict[str, Any]] = {}
        for name, df in tables.items():
            write_table(tmp / f"{name}.parquet", df)
        if tensors:
            save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / SAMPLES))
        for fname, ts in (tensor_files or {}).items():
            if ts:
                save_file({k: v.contiguous() for k, v in ts.items()}, str(tmp / fname))
        for f in sorted(tmp.iterdir()):
            files[f.name] = {"bytes": f.stat().st_size, "sha256": sha256_file(f)}
        # created_ns orders entries written within the same second (list_entries: newest first)
        full = {"schema": SCHEMA_VERSION, "created": time.strftime("%Y-%m-%dT%H:%M:%S"), "created_ns": time.time_ns(),
                **manifest, "files": files}
        atomic_write_bytes(tmp / MANIFEST, json.dumps(full, indent=1, default=str).encode())
        if path.exists():
            if read_manifest(path) is not None:
                shutil.rmtree(tmp, ignore_errors=True)
                return path  # a valid entry appeared meanwhile (another process): theirs is as good
            _discard(path)
        try:
            os.rename(tmp, path)
        except OSError:
            if read_manifest(path) is None:
                raise
            shutil.rmtree(tmp, ignore_errors=True)
        return path
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _discard(path: Path) -> None:
    """Move a broken entry aside atomically, then delete it."""
    trash = path.with_name(f".{path.name}.broken-{os.getpid()}-{time.time_ns()}")
    try:
        os.rename(path, trash)
    except OSError:
        return
    shutil.rmtree(trash, ignore_errors=True)


def read_manifest(path: Path, verify: bool = True) -> dict[str, Any] | None:
    """The manifest of a complete, intact entry of the current schema; ``None`` otherwise."""
    return read_checked_manifest(path, MANIFEST, "schema", SCHEMA_VERSION, verify=verify, unhashed=UNVERIFIED)


def read_checked_manifest(folder: Path, manifest: str, key: str, value: Any, *, verify: bool = True,
                          unhashed: tuple[str, ...] = ()) -> dict[str, Any] | None:
    """``folder/manifest`` (JSON) if its ``key`` is ``value`` and every file it lists has the listed size and (with
    ``verify``, except ``unhashed``) sha256; ``None`` otherwise. Shared by cache entries and converted GGUF folders."""
    try:
        m = json.loads((folder / manifest).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(m, dict) or m.get(key) != value or not isinstance(m.get("files"), dict):
        return None
    for name, meta in m["files"].items():
        f = folder / name
        try:
            if f.stat().st_size != meta["bytes"]:
                return None
            if verify and name not in unhashed and sha256_file(f) != meta["sha256"]:
                return None
        except (OSError, KeyError, TypeError):
            return None
    return m


def load_tables(path: Path) -> dict[str, pd.DataFrame]:
    return {t: read_table(path / f"{t}.parquet") for t in TABLES}


class TensorFile(Mapping[str, torch.Tensor]):
    """A safetensors file of the entry as a read-only mapping whose tensors are read when asked for (the kept
    input samples of a large model are hundreds of MB; a pass needs one linear's at a time). The header is read
    and checked at open; a key that cannot be read raises ``CacheError``."""

    def __init__(self, path: Path, what: str):
        from safetensors import safe_open

        self._what = what
        self._lock = threading.Lock()
        try:
            self._file = safe_open(str(path), framework="pt")
            self._keys = tuple(self._file.keys())
            self._known = frozenset(self._keys)
        except Exception as e:  # noqa: BLE001
            raise CacheError(f"{what} is unreadable ({type(e).__name__})") from e

    def __getitem__(self, key: str) -> torch.Tensor:
        if key not in self._known:
            raise KeyError(key)
        with self._lock:
            try:
                return self._file.get_tensor(key)
            except Exception as e:  # noqa: BLE001
                raise CacheError(f"{self._what} is unreadable ({type(e).__name__})") from e

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)


def load_samples(path: Path) -> TensorFile:
    """The kept input samples of an entry (``samples.safetensors``), read key by key."""
    return TensorFile(path / SAMPLES, "cached input sample")


def pack_symmetric(h: torch.Tensor) -> torch.Tensor:
    """The upper triangle (diagonal included) of a symmetric ``[n, n]`` matrix, row by row, as float32 ``[n(n+1)/2]``."""
    n = h.shape[0]
    mask = torch.ones(n, n, dtype=torch.bool).triu_()
    return h.float()[mask]


def unpack_symmetric(v: torch.Tensor, n: int) -> torch.Tensor:
    """Inverse of ``pack_symmetric``: the full symmetric ``[n, n]`` float32 matrix."""
    if v.numel() != n * (n + 1) // 2:
        raise CacheError(f"a packed {n} x {n} matrix needs {n * (n + 1) // 2} values, got {v.numel()}")
    mask = torch.ones(n, n, dtype=torch.bool).triu_()
    h = torch.zeros(n, n, dtype=torch.float32)
    h[mask] = v.float()
    # mirror the strict upper triangle: h + h^T counts the diagonal twice
    return h + h.triu(1).T


def load_tensor(path: Path, fname: str, key: str) -> torch.Tensor | None:
    """One tensor of a safetensors file of the entry (read lazily), or ``None`` if the file or key is missing."""
    from safetensors import safe_open

    f = path / fname
    if not f.exists():
        return None
    try:
        with safe_open(str(f), framework="pt") as st:
            if key not in st.keys():
                return None
            return st.get_tensor(key)
    except Exception as e:  # noqa: BLE001
        raise CacheError(f"cached tensor file {fname} is unreadable ({type(e).__name__})") from e


def list_entries(cache_dir: str | Path) -> list[dict[str, Any]]:
    """Every intact entry: its manifest plus ``path``; newest first. Broken entries are skipped."""
    root = Path(cache_dir).expanduser()
    out = []
    if not root.is_dir():
        return out
    for model_dir in sorted(root.iterdir()):
        if not model_dir.is_dir() or model_dir.name.startswith("."):
            continue
        for entry in sorted(model_dir.iterdir()):
            if entry.name.startswith(".") or not entry.is_dir():
                continue
            m = read_manifest(entry, verify=False)
            if m is not None:
                out.append({**m, "path": str(entry)})
    return sorted(out, key=lambda m: (m.get("created", ""), m.get("created_ns", 0)), reverse=True)


def write_extra_table(path: Path, name: str, df: pd.DataFrame) -> None:
    """An additional table beside a complete entry (e.g. model-quality results), written atomically."""
    write_table(path / f"{name}.parquet", df)


def read_extra_table(path: Path, name: str) -> pd.DataFrame | None:
    """An additional table, or ``None`` when missing or corrupt (a corrupt one is removed)."""
    f = path / f"{name}.parquet"
    if not f.exists():
        return None
    try:
        return read_table(f)
    except CacheError:
        try:
            f.unlink()
        except OSError:
            pass
        return None
