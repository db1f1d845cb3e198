"""checks, repro, data and evaluate: small references and invariants."""
import json
import math

import pytest
import torch
from hypothesis import given, strategies as st

import labkit as lk
from labkit import data as D, evaluate as E, repro as R


def test_check_messages_carry_the_hint():
    lk.check(True, "fine")
    with pytest.raises(AssertionError, match="hint: look again"):
        lk.check(False, "wrong", hint="look again")
    lk.check_close(1.05, 1.0, rtol=0.1)
    with pytest.raises(AssertionError, match="expected 1"):
        lk.check_close(1.5, 1.0, rtol=0.1, what="x")
    lk.check_close(torch.ones(3), torch.ones(3) + 1e-7, atol=1e-6)
    with pytest.raises(AssertionError, match="shape"):
        lk.check_close(torch.ones(3), torch.ones(4))
    with pytest.raises(AssertionError):
        lk.check_between(5, 0, 1)


@given(st.integers(-10**6, 10**6), st.integers(-5, 5), st.one_of(st.none(), st.integers(-5, 10)))
def test_whole_number_is_the_one_integer_check(v, low, high):
    """labkit's one whole-number argument check (pools, sparse formats, estimators, distillation all use it):
    an int or numpy integer passes through unchanged inside [low, high]; outside, ValueError naming the argument."""
    import numpy as np
    from labkit.checks import whole_number
    for value in (v, np.int64(v)):
        if low <= v and (high is None or v <= high):
            out = whole_number("n", value, low, high=high)
            assert out == v and type(out) is int
        else:
            with pytest.raises(ValueError, match="n must be"):
                whole_number("n", value, low, high=high)


@pytest.mark.parametrize("bad", [2.0, True, "3", None, torch.tensor(3)])
def test_whole_number_never_truncates(bad):
    from labkit.checks import whole_number
    with pytest.raises(TypeError, match="whole number"):
        whole_number("n", bad, 0, "a count")


@pytest.mark.parametrize("bad, err", [(float("nan"), ValueError), (float("inf"), ValueError), (-1.0, ValueError),
                                      ("1", TypeError), (False, TypeError)])
def test_real_number_with_a_floor_refuses_what_is_below_it_or_not_finite(bad, err):
    from labkit.checks import real_number
    assert real_number("x", 2.5, low=0) == 2.5
    with pytest.raises(err, match="x must be"):
        real_number("x", bad, "a size", low=0)


def test_atomic_write_and_results(tmp_path, monkeypatch):
    p = R.atomic_write_json(tmp_path / "a" / "r.json", {"b": 1})
    assert json.loads(p.read_text()) == {"b": 1}
    assert not [f for f in p.parent.iterdir() if f.name.endswith(".tmp")]
    plain = tmp_path / "plain.json"
    plain.write_text("{}")
    assert p.stat().st_mode & 0o777 == plain.stat().st_mode & 0o777, "same permissions as a file written with open()"
    monkeypatch.setattr(R, "RESULTS_DIR", tmp_path)
    with pytest.raises(FileNotFoundError, match="python -m labkit results nothing"):
        R.load_results("nothing")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="corrupt"):
        R.load_results("bad")


def test_seed_everything_repeats():
    lk.seed_everything(3)
    a = torch.randn(4)
    lk.seed_everything(3)
    assert torch.equal(a, torch.randn(4))


def test_splits_are_disjoint_and_cover_every_book():
    train, val, test = (set(D.books(s)) for s in ("train", "validation", "test"))
    assert not (train & val) and not (train & test) and not (val & test)
    assert train | val | test == set(D.books()) and len(D.books()) == 66
    assert "Genesis" in train
    with pytest.raises(ValueError, match="split must be"):
        D.books("dev")


@given(st.integers(2, 64), st.integers(1, 2000))
def test_windows_are_disjoint_and_in_range(seq_len, budget):
    tokens = torch.arange(1000)
    if budget < seq_len:  # a budget that scores no full window is a mistake, not "one window"
        with pytest.raises(ValueError, match="max_tokens must be ≥ .*at least one full window"):
            E.windows(tokens, seq_len, budget)
        return
    w = E.windows(tokens, seq_len, budget)
    assert w.shape[1] == seq_len and len(w) == min(1000 // seq_len, budget // seq_len)
    starts = w[:, 0]
    assert torch.all(starts % seq_len == 0) and len(set(starts.tolist())) == len(w)


def test_perplexity_matches_a_naive_loop(tiny):
    tokens = torch.randint(0, 256, (600,))
    ppl = E.perplexity(tiny, tokens, seq_len=32, max_tokens=128, batch_size=3)
    nll, n = 0.0, 0
    with torch.no_grad():
        for w in E.windows(tokens, 32, 128):
            logits = tiny(input_ids=w[None]).logits[0]
            for t in range(31):
                nll -= torch.log_softmax(logits[t], -1)[w[t + 1]].item()
                n += 1
    assert math.isclose(ppl, math.exp(nll / n), rel_tol=1e-5)
    assert ppl == E.perplexity(tiny, tokens, seq_len=32, max_tokens=128, batch_size=3)
    assert ppl.tokens == 128 and str(ppl).startswith("ppl₁₂₈ = ")


@pytest.mark.parametrize("bad, err", [(0, ValueError), (-1000, ValueError), (31, ValueError), (64.0, TypeError),
                                      ("128", TypeError), (True, TypeError)])
def test_perplexity_refuses_a_budget_that_scores_nothing(tiny, bad, err):
    with pytest.raises(err, match="max_tokens"):
        E.perplexity(tiny, torch.randint(0, 256, (600,)), seq_len=32, max_tokens=bad)


def test_gap_closed_is_the_share_of_the_log_perplexity_gap():
    assert E.gap_closed(10.0, 100.0, 10.0) == pytest.approx(1.0)
    assert E.gap_closed(10.0, 100.0, 100.0) == pytest.approx(0.0)
    assert E.gap_closed(10.0, 100.0, math.sqrt(1000)) == pytest.approx(0.5)
    assert E.gap_closed(10.0, 100.0, 1000.0) == pytest.approx(-1.0)
    for bad in [(10.0, 9.0, 9.5), (10.0, float("nan"), 20.0), (0.5, 100.0, 20.0), (10.0, 100.0, "20")]:
        with pytest.raises((ValueError, TypeError)):
            E.gap_closed(*bad)


def test_budget_follows_full_mode(monkeypatch):
    monkeypatch.delenv("LABKIT_FULL", raising=False)
    assert E.default_budget() == 4096
    monkeypatch.setenv("LABKIT_FULL", "1")
    assert E.default_budget() == 32768 and lk.full_mode()


def test_batches_are_reproducible():
    class Tok:  # a character-level stand-in tokenizer keeps this test fast
        eos_token_id = 0

        def __call__(self, texts, add_special_tokens=False):
            return {"input_ids": [[ord(c) % 255 + 1 for c in t[:50]] for t in texts]}

        def get_vocab(self):
            return {"x": 1}
    a = next(D.batches("validation", Tok(), seq_len=16, batch_size=2, seed=1))
    b = next(D.batches("validation", Tok(), seq_len=16, batch_size=2, seed=1))
    assert torch.equal(a, b) and a.shape == (2, 16)
