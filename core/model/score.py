"""Scoring a model's output against its full-precision reference, batch by batch: next-token metrics for causal
LMs (perplexity with its standard error, KL(p_fp || q) per token, same top token, RMS change of the target's
probability, each with llama.cpp's ±: its ``--kl-divergence`` report) and embedding fidelity for encoders. The
definitions are ``core.grids.metrics``'; this accumulates them without keeping log-probabilities.

Which positions are scored is the **protocol** (``PROTOCOLS``):

* ``llama.cpp`` (the default of Model quality): ``llama-perplexity``'s (tools/perplexity/perplexity.cpp,
  ``kl_divergence``): every held-out window of ``n_ctx`` tokens is evaluated on its own, its first token replaced by
  BOS when the model's tokenizer adds one (llama.cpp's ``add_bos``; SmolLM2's GGUF does not), and only the
  predictions at positions ``n_ctx/2 .. n_ctx-2`` are scored (``n_ctx - 1 - n_ctx/2`` tokens per window, each with
  at least half a window of context). Percentiles are left out under 100 scored tokens, as llama.cpp does.
* ``all-positions``: every prediction of every window from the first position, no BOS (the explorer's scoring
  before issue 19; it weighs the short-context start of each window, which llama.cpp leaves out).

The ± of every statistic is llama.cpp's ``mean_and_uncertainty``: ``sqrt((E[v^2] - E[v]^2) / (n - 1))`` (0 for 10
or fewer tokens); same top ``sqrt(p (1 - p) / (n - 1))``; RMS Δp ``0.5 / rms * ±(mean Δp^2)``; perplexity
``ppl * ±(mean NLL)``. llama.cpp stores the reference log-probs as 16-bit integers over the top 16 nats and drops
terms below log p = -16; the explorer keeps them in float32 (a difference of ~1e-6 nats per token)."""
from __future__ import annotations

import math
from typing import Callable, Iterator

import torch

from ..grids import metrics
from .blocks import block_major, forward
from .stream import SpillList
from .models import LoadedModel

Progress = Callable[[float, str], None]
LLAMACPP = "llama.cpp"
ALL_POSITIONS = "all-positions"
PROTOCOLS = (LLAMACPP, ALL_POSITIONS)
PROTOCOL_DEFINITIONS = {
    LLAMACPP: "llama-perplexity's protocol: each held-out window on its own (BOS first when the tokenizer adds one), "
              "only the predictions at positions n_ctx/2 .. n_ctx-2 scored",
    ALL_POSITIONS: "every prediction of every held-out window from the first position, no BOS",
}
KL_BUDGET_BYTES = 512 * 2**20  # full-precision log-probs kept at once (the held-out set is chunked beyond)
LOGIT_BATCH_ELEMENTS = 32 * 2**20  # logits per forward batch (bounds memory on large vocabularies)
SCORE_CHUNK_ELEMENTS = 8 * 2**20  # log-probs scored at once (token rows x vocabulary; the temporaries of KL)


def check_protocol(protocol: str) -> str:
    p = str(protocol).strip().lower()
    if p not in PROTOCOLS:
        raise ValueError(f"unknown scoring protocol {protocol!r}; pick from {', '.join(PROTOCOLS)}")
    return p


def first_scored(protocol: str, n_ctx: int) -> int:
    """The first position whose prediction is scored in a window of ``n_ctx`` tokens."""
    return n_ctx // 2 if protocol == LLAMACPP else 0


def adds_bos(lm: LoadedModel) -> int | None:
    """The BOS token id when the model's tokenizer puts one first (llama.cpp's ``add_bos``), else None."""
    tok = lm.tokenizer
    bos = getattr(tok, "bos_token_id", None)
    if bos is None or not lm.is_causal:
        return None
    try:
        ids = tok("a", add_special_tokens=True)["input_ids"]
    except Exception:  # noqa: BLE001 - a tokenizer without a call interface: no BOS
        return None
    return int(bos) if len(ids) and int(ids[0]) == int(bos) else None


def windows(lm: LoadedModel, ids: torch.Tensor, protocol: str) -> torch.Tensor:
    """The held-out windows ``[n, n_ctx]`` as ``protocol`` evaluates them: llama.cpp's replaces each window's first
    token by BOS when the tokenizer adds one (as ``llama-perplexity`` does); a copy, ``ids`` is not modified."""
    bos = adds_bos(lm) if protocol == LLAMACPP else None
    if bos is None:
        return ids
    out = ids.clone()
    out[:, 0] = bos
    return out


def mean_se(total: float, total_sq: float, n: int) -> tuple[float, float]:
    """llama.cpp's ``mean_and_uncertainty``: the mean and ``sqrt((E[v^2] - E[v]^2) / (n - 1))`` (0 for n <= 10)."""
    if n < 1:
        return float("nan"), float("nan")
    m = total / n
    var = total_sq / n - m * m
    return m, (math.sqrt(var / (n - 1)) if var > 0 and n > 10 else 0.0)


def vocab(lm: LoadedModel) -> int:
    return int(getattr(lm.model.config, "vocab_size", 0) or 0) or 50000


def eval_batches(lm: LoadedModel, ids: torch.Tensor, batch_tokens: int) -> list[torch.Tensor]:
    t = ids.shape[1]
    per = max(1, int(batch_tokens) // t)
    if lm.is_causal:
        per = max(1, min(per, LOGIT_BATCH_ELEMENTS // (t * vocab(lm))))
    return [ids[i:i + per] for i in range(0, ids.shape[0], per)]


def held_chunks(lm: LoadedModel, ids: torch.Tensor) -> list[torch.Tensor]:
    """Held-out blocks in chunks whose full-precision reference fits ``KL_BUDGET_BYTES`` (a streamed model: one
    chunk, its reference kept in a ``SpillList``, so each block is read once per variant)."""
    if not lm.is_causal or lm.streamer is not None:
        return [ids]
    per = max(1, KL_BUDGET_BYTES // (ids.shape[1] * vocab(lm) * 4))
    return [ids[i:i + per] for i in range(0, ids.shape[0], per)]


def output(lm: LoadedModel, ids: torch.Tensor) -> torch.Tensor:
    """Logits ``[b, t, vocab]`` (causal) or last hidden states ``[b, t, h]`` of ``ids``, float32."""
    return _as_output(lm, forward(lm, ids))


def outputs(lm: LoadedModel, batches: list[torch.Tensor]) -> Iterator[torch.Tensor]:
    """:func:`output` of each batch, one at a time; a streamed model runs them block by block
    (``core.model.blocks.block_major``: each block read once for all batches)."""
    if lm.streamer is None:
        for b in batches:
            yield output(lm, b)
        return
    for out in block_major(lm, batches):
        yield _as_output(lm, out)


def _as_output(lm: LoadedModel, out) -> torch.Tensor:
    if lm.is_causal:
        return out.logits.float()
    h = getattr(out, "last_hidden_state", None)
    if h is None:
        h = out[0]
    return h.float()


class Score:
    """Accumulates one model's metrics against the full-precision reference, batch by batch. Causal LMs keep
    one float64 KL value per scored token (for the percentiles), never the log-probabilities. ``protocol``: which
    positions are scored (module docstring); the windows themselves come from :func:`windows`."""

    def __init__(self, causal: bool, protocol: str = ALL_POSITIONS):
        self.causal = causal
        self.protocol = check_protocol(protocol)
        self.ce = self.ce2 = self.dp2 = self.dp4 = 0.0
        self.same = 0
        self.kls: list[torch.Tensor] = []
        self.err = self.ref = self.cos = 0.0
        self.n_tok = self.n_seq = 0

    def scored(self, out: torch.Tensor) -> torch.Tensor:
        """The logits ``[b, t, vocab]`` of the predictions this protocol scores: ``[b, t - 1 - first, vocab]``."""
        return out[:, first_scored(self.protocol, out.shape[1]):-1]

    def add(self, ids: torch.Tensor, out: torch.Tensor, ref: torch.Tensor | None) -> None:
        """``out``: logits ``[b, t, vocab]`` (causal) or last hidden states ``[b, t, h]``; ``ref``: the fp
        log-probs of the scored predictions ``[b, t - 1 - first, vocab]`` (:func:`reference`) / hidden states,
        ``None`` for the reference itself. Causal logits are scored ``SCORE_CHUNK_ELEMENTS`` at a time (token rows;
        every per-token value is the same as scoring them at once, and the sums run over all of them at the end)."""
        if self.causal:
            first = first_scored(self.protocol, ids.shape[1])
            scored = self.scored(out)
            tgt = ids[:, 1 + first:].to(out.device)
            ces, kls, sames, dps = [], [], [], []
            for at in _row_chunks(scored):
                logp = torch.log_softmax(scored[at], dim=-1)
                y = tgt[at]
                ces.append(-logp.gather(-1, y.unsqueeze(-1)).squeeze(-1).double())
                if ref is not None:
                    kl, same, dp = metrics.token_divergence(ref[at], logp, y)
                    kls.append(kl)
                    sames.append(same)
                    dps.append(dp)
                del logp
            ce = torch.cat(ces)
            self.ce += float(ce.sum())
            self.ce2 += float(ce.pow(2).sum())
            self.n_tok += int(tgt.numel())
            if ref is not None:
                self.kls.append(torch.cat(kls).cpu())
                self.same += int(torch.cat(sames).sum())
                dp = torch.cat(dps)
                self.dp2 += float(dp.pow(2).sum())
                self.dp4 += float(dp.pow(4).sum())
        else:
            self.n_tok += int(ids.numel())
            self.n_seq += int(ids.shape[0])
            if ref is not None:
                self.err += float((out - ref).double().pow(2).sum())
                self.ref += float(ref.double().pow(2).sum())
                self.cos += float(torch.nn.functional.cosine_similarity(out.mean(1).double(), ref.mean(1).double(),
                                                                        dim=-1).sum())

    def kl_values(self) -> torch.Tensor:
        return torch.cat(self.kls) if self.kls else torch.zeros(self.n_tok, dtype=torch.float64)

    def _percentile(self, kl: torch.Tensor, f: float) -> float:
        if self.protocol == LLAMACPP and self.n_tok < 100:  # llama.cpp reports no statistics on so few values
            return float("nan")
        return metrics.percentile(kl, f)

    def metrics(self, fp: bool = False) -> dict[str, float]:
        if self.causal:
            ppl, se = metrics.perplexity_with_se(self.ce, self.ce2, self.n_tok)
            if fp:
                return {"perplexity": ppl, "perplexity_se": se, "kl": 0.0, "kl_se": 0.0, "kl_p99": 0.0,
                        "kl_p999": 0.0, "same_top": 1.0, "same_top_se": 0.0, "rms_dp": 0.0, "rms_dp_se": 0.0}
            kl = self.kl_values()
            n = max(1, self.n_tok)
            kl_mean, kl_se = mean_se(float(kl.sum()), float(kl.pow(2).sum()), self.n_tok)
            mse, mse_se = mean_se(self.dp2, self.dp4, self.n_tok)
            rms = math.sqrt(max(mse, 0.0))
            top = self.same / n
            return {"perplexity": ppl, "perplexity_se": se, "kl": kl_mean, "kl_se": kl_se,
                    "kl_p99": self._percentile(kl, 0.99), "kl_p999": self._percentile(kl, 0.999),
                    "same_top": top, "same_top_se": math.sqrt(top * (1 - top) / (n - 1)) if n > 1 else float("nan"),
                    "rms_dp": rms, "rms_dp_se": 0.5 / rms * mse_se if rms > 0 else 0.0}
        if fp:
            return {"cosine": 1.0, "hidden_rel_error": 0.0}
        return {"cosine": self.cos / max(1, self.n_seq),
                "hidden_rel_error": self.err / self.ref if self.ref > 0 else float("nan")}


def reference(lm: LoadedModel, batches: list[torch.Tensor], score: Score,
               progress: Progress | None = None) -> list[torch.Tensor] | SpillList:
    """The fp reference of each batch (log-probs of the scored predictions, or hidden states), added to
    ``score``; a streamed model keeps them in a ``SpillList`` (in memory up to its budget, ``$AWQ_EXPLORER_SPILL_MB``,
    then in a scratch file)."""
    refs: list[torch.Tensor] | SpillList = [] if lm.streamer is None else SpillList()
    for i, (b, out) in enumerate(zip(batches, outputs(lm, batches))):
        score.add(b, out, None)
        refs.append(_log_probs(score.scored(out)) if lm.is_causal else out)
        del out
        if progress:
            progress((i + 1) / len(batches), f"full-precision reference: batch {i + 1}/{len(batches)}")
    return refs


def _log_probs(logits: torch.Tensor) -> torch.Tensor:
    """``log_softmax`` over the vocabulary of ``[b, n, vocab]``, ``SCORE_CHUNK_ELEMENTS`` at a time (row by row the
    same values, without a second full-size temporary)."""
    out = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
    for at in _row_chunks(logits):
        out[at] = torch.log_softmax(logits[at], dim=-1)
    return out


def _row_chunks(x: torch.Tensor) -> Iterator[tuple[int, slice]]:
    """Index ``(window, token rows)`` of ``x [b, n, vocab]`` in order, ``SCORE_CHUNK_ELEMENTS`` elements at most."""
    rows = max(1, SCORE_CHUNK_ELEMENTS // max(1, x.shape[-1]))
    for i in range(x.shape[0]):
        for a in range(0, x.shape[1], rows):
            yield i, slice(a, a + rows)
