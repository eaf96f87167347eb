"""Scoring a model's output against its full-precision reference, batch by batch: next-token metrics for causal
LMs (perplexity with its standard error, KL(p_fp || q) per token, same top token, RMS change of the target's
probability: llama.cpp's ``--kl-divergence`` report) and embedding fidelity for encoders. The definitions are
``core.grids.metrics``'; this accumulates them without keeping log-probabilities."""
from __future__ import annotations

import math
from typing import Callable

import torch

from ..grids import metrics
from .blocks import forward
from .models import LoadedModel

Progress = Callable[[float, str], None]
KL_BUDGET_BYTES = 512 * 2**20  # full-precision log-probs kept at once (the held-out set is chunked beyond)
LOGIT_BATCH_ELEMENTS = 32 * 2**20  # logits per forward batch (bounds memory on large vocabularies)


def vocab(lm: LoadedModel) -> int:
    return int(getattr(lm.model.config, "vocab_size", 0) or 0) or 50000


def eval_batches(lm: LoadedModel, ids: torch.Tensor, batch_tokens: int) -> list[torch.Tensor]:
    t = ids.shape[1]
    per = max(1, int(batch_tokens) // t)
    if lm.is_causal:
        per = max(1, min(per, LOGIT_BATCH_ELEMENTS // (t * vocab(lm))))
    return [ids[i:i + per] for i in range(0, ids.shape[0], per)]


def held_chunks(lm: LoadedModel, ids: torch.Tensor) -> list[torch.Tensor]:
    """Held-out blocks in chunks whose full-precision reference fits ``KL_BUDGET_BYTES``."""
    if not lm.is_causal:
        return [ids]
    per = max(1, KL_BUDGET_BYTES // (ids.shape[1] * vocab(lm) * 4))
    return [ids[i:i + per] for i in range(0, ids.shape[0], per)]


def output(lm: LoadedModel, ids: torch.Tensor) -> torch.Tensor:
    out = forward(lm, ids)
    if lm.is_causal:
        return out.logits.float()
    h = getattr(out, "last_hidden_state", None)
    if h is None:
        h = out[0]
    return h.float()


class Score:
    """Accumulates one model's metrics against the full-precision reference, batch by batch. Causal LMs keep
    one float64 KL value per scored token (for the percentiles), never the log-probabilities."""

    def __init__(self, causal: bool):
        self.causal = causal
        self.ce = self.ce2 = self.dp2 = 0.0
        self.same = 0
        self.kls: list[torch.Tensor] = []
        self.err = self.ref = self.cos = 0.0
        self.n_tok = self.n_seq = 0

    def add(self, ids: torch.Tensor, out: torch.Tensor, ref: torch.Tensor | None) -> None:
        """``out``: logits ``[b, t, vocab]`` (causal) or last hidden states ``[b, t, h]``; ``ref``: the fp
        log-probs ``[b, t-1, vocab]`` / hidden states, ``None`` for the reference itself."""
        if self.causal:
            logp = torch.log_softmax(out[:, :-1], dim=-1)
            tgt = ids[:, 1:].to(logp.device)
            ce = -logp.gather(-1, tgt.unsqueeze(-1)).squeeze(-1).double()
            self.ce += float(ce.sum())
            self.ce2 += float(ce.pow(2).sum())
            self.n_tok += int(tgt.numel())
            if ref is not None:
                kl, same, dp = metrics.token_divergence(ref, logp, tgt)
                self.kls.append(kl.reshape(-1).cpu())
                self.same += int(same.sum())
                self.dp2 += float(dp.pow(2).sum())
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

    def metrics(self, fp: bool = False) -> dict[str, float]:
        if self.causal:
            ppl, se = metrics.perplexity_with_se(self.ce, self.ce2, self.n_tok)
            if fp:
                return {"perplexity": ppl, "perplexity_se": se, "kl": 0.0, "kl_p99": 0.0, "kl_p999": 0.0,
                        "same_top": 1.0, "rms_dp": 0.0}
            kl = self.kl_values()
            n = max(1, self.n_tok)
            return {"perplexity": ppl, "perplexity_se": se, "kl": float(kl.sum()) / n,
                    "kl_p99": metrics.percentile(kl, 0.99), "kl_p999": metrics.percentile(kl, 0.999),
                    "same_top": self.same / n, "rms_dp": math.sqrt(self.dp2 / n)}
        if fp:
            return {"cosine": 1.0, "hidden_rel_error": 0.0}
        return {"cosine": self.cos / max(1, self.n_seq),
                "hidden_rel_error": self.err / self.ref if self.ref > 0 else float("nan")}


def reference(lm: LoadedModel, batches: list[torch.Tensor], score: Score,
               progress: Progress | None = None) -> list[torch.Tensor]:
    refs = []
    for i, b in enumerate(batches):
        out = output(lm, b)
        score.add(b, out, None)
        refs.append(torch.log_softmax(out[:, :-1], dim=-1) if lm.is_causal else out)
        if progress:
            progress((i + 1) / len(batches), f"full-precision reference: batch {i + 1}/{len(batches)}")
    return refs
