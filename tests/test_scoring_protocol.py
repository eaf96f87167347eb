"""The scoring protocols of Model quality (issue 19, item 5): llama.cpp's (windows on their own, BOS first when the
tokenizer adds one, positions n_ctx/2 .. n_ctx-2 scored, llama.cpp's ± for every statistic) and the old
all-positions scoring, against a hand computation of tools/perplexity/perplexity.cpp's formulas; cached rows of
both kept apart; and, when llama.cpp's tools are built, llama-perplexity --kl-divergence on the same logits."""
from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from conftest import tiny_settings
from core.analysis import analyze
from core.model import score
from core.studies import evaluate

GS = 32


def hand_llamacpp(ref_logits: np.ndarray, logits: np.ndarray, ids: np.ndarray) -> dict[str, float]:
    """perplexity.cpp's kl_divergence statistics computed by hand (float64, one loop per token) on windows
    ``ids [n, t]`` with logits ``[n, t, vocab]``: positions t/2 .. t-2 predict tokens t/2+1 .. t-1."""
    n_ctx = ids.shape[1]
    first = n_ctx // 2
    nll, kls, dps, same = [], [], [], 0
    for w in range(ids.shape[0]):
        for i in range(first, n_ctx - 1):
            tok = ids[w, i + 1]
            lq = logits[w, i] - logits[w, i].max()
            lq = lq - math.log(np.exp(lq).sum())
            lp = ref_logits[w, i] - ref_logits[w, i].max()
            lp = lp - math.log(np.exp(lp).sum())
            nll.append(-lq[tok])
            kls.append(float((np.exp(lp) * (lp - lq)).sum()))
            dps.append(math.exp(lq[tok]) - math.exp(lp[tok]))
            same += int(np.argmax(lq) == np.argmax(lp))
    n = len(nll)

    def mean_unc(v):
        v = np.asarray(v, dtype=np.float64)
        f = v.sum() / n
        df = (v ** 2).sum() / n - f * f
        return f, (math.sqrt(df / (n - 1)) if df > 0 and n > 10 else 0.0)
    m_nll, u_nll = mean_unc(nll)
    kl, kl_u = mean_unc(kls)
    mse, mse_u = mean_unc(np.asarray(dps) ** 2)
    rms = math.sqrt(mse)
    p = same / n
    ks = np.sort(kls)

    def pct(f):
        x = f * (n - 1)
        i = int(x)
        return (1 - (x - i)) * ks[i] + (x - i) * ks[min(i + 1, n - 1)]
    return {"perplexity": math.exp(m_nll), "perplexity_se": math.exp(m_nll) * u_nll, "kl": kl, "kl_se": kl_u,
            "kl_p99": pct(0.99), "kl_p999": pct(0.999), "same_top": p, "same_top_se": math.sqrt(p * (1 - p) / (n - 1)),
            "rms_dp": rms, "rms_dp_se": 0.5 / rms * mse_u, "n": n}


def test_score_follows_llamacpp_by_hand():
    g = torch.Generator().manual_seed(0)
    n, t, v = 3, 80, 50
    ids = torch.randint(0, v, (n, t), generator=g)
    ref = torch.randn(n, t, v, generator=g) * 2
    q = ref + 0.5 * torch.randn(n, t, v, generator=g)
    s_ref, s = score.Score(True, score.LLAMACPP), score.Score(True, score.LLAMACPP)
    refs = torch.log_softmax(s_ref.scored(ref), dim=-1)
    s_ref.add(ids, ref, None)
    s.add(ids, q, refs)
    got = s.metrics()
    want = hand_llamacpp(ref.double().numpy(), q.double().numpy(), ids.numpy())
    assert s.n_tok == want["n"] == n * (t - 1 - t // 2)
    for k, w in want.items():
        if k != "n":
            assert got[k] == pytest.approx(w, rel=2e-5, abs=1e-9), k
    # the all-positions protocol scores every prediction and differs
    a = score.Score(True, score.ALL_POSITIONS)
    a.add(ids, q, torch.log_softmax(ref[:, :-1], dim=-1))
    assert a.n_tok == n * (t - 1) and a.metrics()["kl"] != pytest.approx(got["kl"], rel=1e-6)


def test_percentiles_skipped_under_100_tokens_and_bos_window():
    ids = torch.randint(0, 20, (1, 40))
    s = score.Score(True, score.LLAMACPP)
    out = torch.randn(1, 40, 20)
    s.add(ids, out, torch.log_softmax(s.scored(out + 0.1), dim=-1))
    m = s.metrics()
    assert s.n_tok == 19 and math.isnan(m["kl_p99"]) and not math.isnan(m["kl"])
    lm = SimpleNamespace(is_causal=True, tokenizer=lambda *a, **k: {"input_ids": [7, 3]})
    lm.tokenizer.bos_token_id = 7
    with_bos = score.windows(lm, ids, score.LLAMACPP)
    assert (with_bos[:, 0] == 7).all() and torch.equal(with_bos[:, 1:], ids[:, 1:]) and not (ids[:, 0] == 7).all()
    assert torch.equal(score.windows(lm, ids, score.ALL_POSITIONS), ids)
    with pytest.raises(ValueError, match="unknown scoring protocol"):
        score.check_protocol("half")


def test_run_quality_protocols_cached_apart(tiny_dir, tokenizer_dir, tmp_path):
    a = analyze(tiny_settings(tiny_dir("llama"), tokenizer_dir), tmp_path)
    new = evaluate.run_quality(a, modes=["rtn"], bits=[4], group_size=GS)
    old = evaluate.run_quality(a, modes=["rtn"], bits=[4], group_size=GS, protocol="all-positions")
    assert set(new["protocol"]) == {"llama.cpp"} and set(old["protocol"]) == {"all-positions"}
    seqlen = a.settings.calibration.seqlen
    held = a.settings.calibration.heldout_samples
    assert (new["n_tokens"] == held * (seqlen - 1 - seqlen // 2)).all() and (old["n_tokens"] == held * (seqlen - 1)).all()
    cached = evaluate.cached_quality(a)
    assert set(cached["protocol"]) == {"llama.cpp", "all-positions"} and len(cached) == len(new) + len(old)
    # version-2 rows (from before the protocol existed) read back as all-positions, never as llama.cpp's
    raw = a.read_extra("quality")
    v2 = raw[raw["protocol"] == "all-positions"].drop(columns=["protocol"]).assign(eval_version=2)
    a.write_extra("quality", v2)
    back = evaluate.cached_quality(a)
    assert set(back["protocol"]) == {"all-positions"} and len(back) == len(old)


@pytest.mark.parametrize("protocol", [score.LLAMACPP, score.ALL_POSITIONS])
def test_score_in_token_chunks_is_bit_identical(monkeypatch, protocol):
    """Score.add and the reference's log-probs work SCORE_CHUNK_ELEMENTS at a time (the streamed engine's memory
    on a 150k vocabulary): every metric, and the reference log-probs, are the same bits whatever the chunk, one
    token row included, as scoring the whole [b, t, vocab] at once."""
    g = torch.Generator().manual_seed(3)
    vocab = 1003
    ids = torch.randint(0, vocab, (3, 40), generator=g)
    fp = torch.randn(3, 40, vocab, generator=g) * 3
    q = fp + 0.3 * torch.randn(3, 40, vocab, generator=g)

    def run(chunk):
        monkeypatch.setattr(score, "SCORE_CHUNK_ELEMENTS", chunk)
        s = score.Score(True, protocol)
        s.add(ids, fp, None)
        ref = score._log_probs(s.scored(fp))
        s2 = score.Score(True, protocol)
        s2.add(ids, q, ref)
        return s.metrics(fp=True), s2.metrics(), ref

    whole = run(1 << 40)
    assert torch.equal(whole[2], torch.log_softmax(fp[:, score.first_scored(protocol, 40):-1], dim=-1))
    for chunk in (vocab, 7 * vocab + 5, 16 * vocab):
        got = run(chunk)
        assert torch.equal(got[2], whole[2])
        for a, b in ((got[0], whole[0]), (got[1], whole[1])):
            assert a.keys() == b.keys()
            for k in a:
                assert a[k] == b[k] or (math.isnan(a[k]) and math.isnan(b[k])), (chunk, k, a[k], b[k])
    assert whole[1]["kl"] > 0 and whole[1]["same_top"] < 1
