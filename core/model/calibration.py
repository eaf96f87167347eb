"""Calibration text -> token blocks ``[n_samples, seqlen]``, split into calibration and held-out parts (and, for the
planner, a test set: the held-out part's blocks after the held-out ones, ``test_blocks``).

Sources: ``bundled`` (Python's own ``pydoc_data.topics``, ~465 KB of English prose, offline), a local
text file, or ``wikitext-2`` / ``pile-val`` from the Hugging Face hub when it is reachable.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .models import hub_reachable

BUNDLED_TEXT = "bundled"
HUB_TEXTS = {
    # name: (dataset repo, file, column) - read with huggingface_hub + pyarrow, no `datasets` needed
    "wikitext-2": ("Salesforce/wikitext", "wikitext-2-raw-v1/test-00000-of-00001.parquet", "text"),
    "pile-val": ("mit-han-lab/pile-val-backup", "val.jsonl.zst", "text"),
}
MAX_TEXT_BYTES = 200 * 1024 * 1024
HELDOUT_EVERY = 10  # every 10th paragraph is held out


class CalibrationError(ValueError):
    """Calibration text that cannot be used; the message is one readable sentence."""


@dataclass(frozen=True)
class CalibrationSpec:
    """Which text, and how it is cut into blocks.

    AWQ's official default is 128 x 512 from pile-val; the CPU-friendly app default is 32 x 256 from
    the bundled text (8,192 tokens), enough for stable per-channel statistics on small models.
    """

    source: str = BUNDLED_TEXT
    n_samples: int = 32
    seqlen: int = 256
    heldout_samples: int = 8


def bundled_text() -> str:
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k].strip() for k in sorted(topics))


def read_text_file(path: str | Path) -> str:
    p = Path(path).expanduser()
    if not p.is_file():
        raise CalibrationError(f"calibration file {str(p)!r} does not exist")
    size = p.stat().st_size
    if size > MAX_TEXT_BYTES:
        raise CalibrationError(f"calibration file {str(p)!r} is {size / 2**20:.0f} MB; the limit is {MAX_TEXT_BYTES // 2**20} MB")
    return decode_text(p.read_bytes(), str(p))


def decode_text(data: bytes, label: str = "the text") -> str:
    if b"\x00" in data[:65536]:
        raise CalibrationError(f"{label} looks like a binary file, not text")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise CalibrationError(f"{label} is not UTF-8 text (byte {e.start})") from e
    if not text.strip():
        raise CalibrationError(f"{label} is empty")
    return text


def hub_text(name: str) -> str:
    repo, filename, column = HUB_TEXTS[name]

    offline = not hub_reachable()  # offline: only a copy already in the local hub cache, no 25 s of retries
    try:
        from huggingface_hub import hf_hub_download

        local = hf_hub_download(repo, filename, repo_type="dataset", local_files_only=offline)
    except Exception as e:  # noqa: BLE001
        why = "the hub is unreachable (offline?) and it is not in the local hub cache" if offline else str(e)[:160]
        raise CalibrationError(f"could not get {name} from the Hugging Face hub: {why}") from e
    if filename.endswith(".parquet"):
        import pyarrow.parquet as pq

        return "\n".join(t for t in pq.read_table(local, columns=[column]).column(column).to_pylist() if t)
    try:
        import io
        import json

        import zstandard  # type: ignore[import-not-found]
    except ImportError as e:
        raise CalibrationError(f"{name} is zstd-compressed: pip install zstandard to read it") from e
    with open(local, "rb") as f:
        reader = io.TextIOWrapper(zstandard.ZstdDecompressor().stream_reader(f), encoding="utf-8")
        texts = []
        for i, line in enumerate(reader):
            texts.append(json.loads(line)[column])
            if i >= 20000:
                break
    return "\n\n".join(texts)


def load_text(source: str) -> str:
    if source == BUNDLED_TEXT:
        return bundled_text()
    if source in HUB_TEXTS:
        return hub_text(source)
    return read_text_file(source)


def split_text(text: str) -> tuple[str, str]:
    """Deterministic split: every 10th paragraph goes to the held-out part, the rest to calibration."""
    paras = [p for p in text.replace("\r\n", "\n").split("\n\n") if p.strip()]
    if len(paras) < HELDOUT_EVERY:
        # Too few paragraphs to interleave: hold out the last tenth of the characters.
        cut = int(len(text) * (1 - 1 / HELDOUT_EVERY))
        return text[:cut], text[cut:]
    calib = [p for i, p in enumerate(paras) if i % HELDOUT_EVERY != HELDOUT_EVERY - 1]
    held = [p for i, p in enumerate(paras) if i % HELDOUT_EVERY == HELDOUT_EVERY - 1]
    return "\n\n".join(calib), "\n\n".join(held)


def tokenize(tokenizer: Any, text: str) -> torch.Tensor:
    """The whole text as one stream of token ids (no special tokens), tokenized paragraph by paragraph."""
    ids: list[int] = []
    chunks = text.split("\n\n")
    for i in range(0, len(chunks), 256):
        piece = "\n\n".join(chunks[i : i + 256])
        if i + 256 < len(chunks):
            piece += "\n\n"
        ids.extend(tokenizer(piece, add_special_tokens=False, verbose=False)["input_ids"])
    return torch.tensor(ids, dtype=torch.long)


def to_blocks(ids: torch.Tensor, n_samples: int, seqlen: int, label: str = "calibration") -> torch.Tensor:
    """Consecutive non-overlapping blocks ``[n, seqlen]`` (as official AWQ cuts pile-val); n <= n_samples."""
    n_avail = ids.numel() // seqlen
    if n_avail < 1:
        raise CalibrationError(
            f"the {label} text is too short: {ids.numel()} tokens, at least {seqlen} are needed for one block"
        )
    n = min(int(n_samples), n_avail)
    return ids[: n * seqlen].reshape(n, seqlen)


@dataclass(frozen=True)
class CalibrationData:
    calib: torch.Tensor  # [n_samples, seqlen] token ids
    heldout: torch.Tensor  # [heldout_samples, seqlen]
    text_sha: str  # identifies the text in the cache key
    seqlen: int

    @property
    def n_tokens(self) -> int:
        return int(self.calib.numel())


def prepare(spec: CalibrationSpec, tokenizer: Any, max_positions: int, text: str | None = None) -> CalibrationData:
    """Blocks for ``spec``; ``seqlen`` is capped at the model's positions. ``text`` overrides the source."""
    if int(spec.n_samples) < 1 or int(spec.seqlen) < 2:
        raise CalibrationError("need at least 1 calibration sample of at least 2 tokens")
    if text is None:
        text = load_text(spec.source)
    if not text.strip():
        raise CalibrationError("the calibration text is empty")
    seqlen = min(int(spec.seqlen), int(max_positions))
    calib_text, held_text = split_text(text)
    calib = to_blocks(tokenize(tokenizer, calib_text), spec.n_samples, seqlen)
    held_ids = tokenize(tokenizer, held_text)
    if held_ids.numel() >= seqlen:
        heldout = to_blocks(held_ids, max(1, spec.heldout_samples), seqlen, "held-out")
    else:
        # A short text: hold out the last calibration block rather than fail.
        if calib.shape[0] < 2:
            raise CalibrationError(
                f"the text is too short for a held-out part: {calib.numel() + held_ids.numel()} tokens, "
                f"need at least {2 * seqlen}"
            )
        calib, heldout = calib[:-1], calib[-1:]
    sha = hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:16]
    return CalibrationData(calib=calib, heldout=heldout, text_sha=sha, seqlen=seqlen)


def test_blocks(spec: CalibrationSpec, tokenizer: Any, max_positions: int, max_tokens: int,
                text: str | None = None) -> tuple[torch.Tensor, int]:
    """A third token set, disjoint from both parts of :func:`prepare`: ``(blocks [n, seqlen], start)``, the whole
    blocks of at most ``max_tokens`` tokens of the held-out part that come *after* the held-out blocks ``prepare``
    takes (``start``: the offset of the first one in the held-out part's token stream). The calibration blocks
    come from other paragraphs; ``prepare``'s split and blocks are unchanged (so are cache keys)."""
    if text is None:
        text = load_text(spec.source)
    seqlen = min(int(spec.seqlen), int(max_positions))
    if int(max_tokens) < seqlen:
        raise CalibrationError(f"a test set needs at least one block of {seqlen} tokens, got {max_tokens}")
    held_ids = tokenize(tokenizer, split_text(text)[1])
    # what prepare() holds out (none when the held-out part is shorter than one block: it holds out a
    # calibration block then, and this part is still unused)
    start = min(max(1, int(spec.heldout_samples)), held_ids.numel() // seqlen) * seqlen
    if held_ids.numel() - start < seqlen:
        raise CalibrationError(f"the held-out text has {max(0, held_ids.numel() - start)} tokens after its "
                               f"{start} held-out tokens; a test set needs at least {seqlen} (a longer text)")
    return to_blocks(held_ids[start:], int(max_tokens) // seqlen, seqlen, "test"), start


def first_blocks(ids: torch.Tensor, max_tokens: int | None) -> torch.Tensor:
    """The first whole blocks of ``ids [n, seqlen]`` holding at most ``max_tokens`` tokens (at least one block)."""
    if max_tokens is None:
        return ids
    return ids[:max(1, min(ids.shape[0], int(max_tokens) // max(1, ids.shape[1])))]
