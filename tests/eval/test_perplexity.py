"""The perplexity protocol on a tiny model: windows, remainder dropped, independent scoring, batching."""

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import make_tiny_model

from lowbit.errors import LowbitError
from lowbit.eval.perplexity import perplexity


def manual_ppl(model, ids, seqlen):
    nlls = []
    for w in range(ids.numel() // seqlen):
        window = ids[w * seqlen : (w + 1) * seqlen].unsqueeze(0)
        with torch.no_grad():
            logits = model(window).logits[0, :-1]
        nlls.append(F.cross_entropy(logits, window[0, 1:]).item())  # mean over the window
    return math.exp(sum(nlls) / len(nlls))  # the papers' exp(mean of per-window means)


@pytest.fixture(scope="module")
def model():
    return make_tiny_model("llama")


def test_matches_hand_protocol_and_drops_remainder(model):
    torch.manual_seed(0)
    seqlen = 32
    ids = torch.randint(0, 384, (3 * seqlen + 17,))
    r = perplexity(model, ids, seqlen=seqlen, progress=False)
    assert (r.windows, r.windows_total, r.tokens_scored) == (3, 3, 3 * (seqlen - 1))
    assert r.perplexity == pytest.approx(manual_ppl(model, ids, seqlen), rel=1e-5)
    # the remainder does not count: appending different tokens after the last full window changes nothing
    other = torch.cat([ids[: 3 * seqlen], torch.zeros(17, dtype=torch.long)])
    assert perplexity(model, other, seqlen=seqlen, progress=False).perplexity == pytest.approx(r.perplexity, rel=1e-6)


def test_windows_are_scored_independently_and_batching_is_exact(model):
    torch.manual_seed(1)
    seqlen = 16
    ids = torch.randint(0, 384, (5 * seqlen,))
    one = perplexity(model, ids, seqlen=seqlen, batch_size=1, progress=False)
    many = perplexity(model, ids, seqlen=seqlen, batch_size=4, progress=False)
    assert many.perplexity == pytest.approx(one.perplexity, rel=1e-5)
    # permuting whole windows permutes terms of the sum: no context crosses a window boundary
    perm = ids.view(5, seqlen)[[4, 2, 0, 1, 3]].reshape(-1)
    assert perplexity(model, perm, seqlen=seqlen, progress=False).perplexity == pytest.approx(one.perplexity, rel=1e-5)


def test_limit_scores_a_prefix(model):
    ids = torch.randint(0, 384, (4 * 16,))
    r = perplexity(model, ids, seqlen=16, limit=2, progress=False)
    assert (r.windows, r.windows_total) == (2, 4)
    assert r.perplexity == pytest.approx(manual_ppl(model, ids[:32], 16), rel=1e-5)


def test_uniform_model_has_vocab_perplexity():
    class Uniform(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.p = torch.nn.Parameter(torch.zeros(1))

        def forward(self, ids, use_cache=False):
            return type("Out", (), {"logits": torch.zeros(*ids.shape, 100)})

    r = perplexity(Uniform(), torch.arange(64) % 100, seqlen=16, progress=False)
    assert r.perplexity == pytest.approx(100.0, rel=1e-6)


def test_too_short_text_is_refused(model):
    with pytest.raises(LowbitError, match="has 10 tokens but at least 32 are needed"):
        perplexity(model, torch.arange(10), seqlen=32, progress=False)
