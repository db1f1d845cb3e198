"""Tests for labkit.distill: the KD loss against a naive loop and torch's kl_div, top-k, checkpoints, resume."""
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import labkit as lk
from labkit import distill as D
from labkit.experiments import distill as XD

V = 50


def naive_kd(s, t, labels, T, alpha):
    """Per-token Python loop in float64: α·T²·Σ p(log p − log q) + (1−α)·(−log softmax(s)[y])."""
    total, n = 0.0, 0
    for i in range(s.shape[0]):
        if labels[i] == -100:
            continue
        zs = [float(x) / T for x in s[i]]
        zt = [float(x) / T for x in t[i]]
        ls = math.log(sum(math.exp(z) for z in zs))
        lt = math.log(sum(math.exp(z) for z in zt))
        kl = sum(math.exp(b - lt) * ((b - lt) - (a - ls)) for a, b in zip(zs, zt))
        ce = -(float(s[i][labels[i]]) - math.log(sum(math.exp(float(x)) for x in s[i])))
        total += alpha * T * T * kl + (1 - alpha) * ce
        n += 1
    return total / n


def rand(shape, seed, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g) * scale


@pytest.mark.parametrize("T,alpha", [(1.0, 0.5), (2.0, 1.0), (4.0, 0.3), (0.5, 0.0)])
def test_kd_loss_matches_naive_loop(T, alpha):
    s, t = rand((2, 3, V), 0), rand((2, 3, V), 1)
    labels = torch.randint(0, V, (2, 3), generator=torch.Generator().manual_seed(2))
    labels[1, 2] = -100
    got = D.kd_loss(s, t, labels, T, alpha)
    want = naive_kd(s.reshape(-1, V), t.reshape(-1, V), labels.reshape(-1).tolist(), T, alpha)
    assert got.item() == pytest.approx(want, rel=1e-5, abs=1e-6)


def test_kd_loss_matches_torch_kl_div_and_cross_entropy():
    s, t = rand((8, V), 3), rand((8, V), 4)
    labels = torch.randint(0, V, (8,))
    T = 3.0
    ref = F.kl_div(F.log_softmax(s / T, -1), F.softmax(t / T, -1), reduction="batchmean") * T * T
    torch.testing.assert_close(D.kd_loss(s, t, None, T, alpha=1.0), ref)
    torch.testing.assert_close(D.kd_loss(s, t, labels, T, alpha=0.0), F.cross_entropy(s, labels))


def test_topk_with_k_equal_vocab_is_the_full_loss_and_parts_are_reported():
    s, t = rand((2, 4, V), 5), rand((2, 4, V), 6)
    labels = torch.randint(0, V, (2, 4))
    v, i = t.topk(V, dim=-1)
    tk = D.TopKLogits(v, i.to(torch.int32), V)
    full, parts = D.kd_loss(s, t, labels, 2.0, 0.7, return_parts=True)
    torch.testing.assert_close(D.kd_loss(s, tk, labels, 2.0, 0.7), full)
    assert full.item() == pytest.approx(0.7 * parts["kd"] + 0.3 * parts["ce"], rel=1e-5)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10_000), k=st.integers(1, V), T=st.floats(0.25, 8.0))
def test_topk_kl_is_nonnegative_and_zero_for_the_teacher_itself(seed, k, T):
    s, t = rand((3, V), seed), rand((3, V), seed + 1)
    v, i = t.topk(k, dim=-1)
    tk = D.TopKLogits(v, i.to(torch.int32), V)
    assert D.kd_loss(s, tk, None, T, alpha=1.0).item() >= -1e-6
    assert D.kd_loss(t, t, None, T, alpha=1.0).item() == pytest.approx(0.0, abs=1e-5)


def _collapsed_kl(s, t, idx, T):
    """KL over k + 1 buckets (the k tokens, then the rest) from full logits, in float64."""
    lp, lq = F.log_softmax(t.double() / T, -1), F.log_softmax(s.double() / T, -1)
    mask = torch.zeros_like(lp, dtype=torch.bool).scatter(-1, idx.long(), True)
    p_b = torch.cat([lp.gather(-1, idx.long()), lp.masked_fill(mask, float("-inf")).logsumexp(-1, True)], -1)
    q_b = torch.cat([lq.gather(-1, idx.long()), lq.masked_fill(mask, float("-inf")).logsumexp(-1, True)], -1)
    return (p_b.exp() * (p_b - q_b)).sum(-1).mean() * T * T


@pytest.mark.parametrize("k,T", [(1, 1.0), (5, 2.0), (20, 4.0), (V - 1, 1.0)])
def test_topk_with_tail_is_the_collapsed_kl_and_a_lower_bound_of_the_full_one(k, T):
    s, t = rand((6, V), 11), rand((6, V), 12)
    v, i = t.topk(k, dim=-1)
    tail = D.tail_logmass(t, i, D.TAIL_TEMPERATURES)
    tk = D.TopKLogits(v, i.to(torch.int32), V, tail, D.TAIL_TEMPERATURES)
    got = D.kd_loss(s, tk, None, T, alpha=1.0)
    assert got.item() == pytest.approx(_collapsed_kl(s, t, i, T).item(), rel=1e-4, abs=1e-6)
    assert got.item() <= D.kd_loss(s, t, None, T, alpha=1.0).item() + 1e-5
    # without the tail at this T the teacher is renormalised over its k tokens (the old, biased target)
    no_tail = D.kd_loss(s, D.TopKLogits(v, i.to(torch.int32), V), None, T, alpha=1.0)
    assert tk.tail_at(3.0) is None and D.kd_loss(s, tk, None, 3.0, 1.0).item() == pytest.approx(
        D.kd_loss(s, D.TopKLogits(v, i.to(torch.int32), V), None, 3.0, 1.0).item(), rel=1e-6)
    x = s.clone().requires_grad_(True)
    D.kd_loss(x, tk, None, T, alpha=1.0).backward()
    assert torch.isfinite(x.grad).all() and torch.isfinite(no_tail)


def test_full_vocab_topk_with_tail_has_finite_gradients():
    s, t = rand((3, V), 13), rand((3, V), 14)
    v, i = t.topk(V, dim=-1)
    tk = D.TopKLogits(v, i.to(torch.int32), V, D.tail_logmass(t, i), D.TAIL_TEMPERATURES)
    x = s.clone().requires_grad_(True)
    loss = D.kd_loss(x, tk, None, 2.0, alpha=1.0)
    loss.backward()
    torch.testing.assert_close(loss, D.kd_loss(s, t, None, 2.0, alpha=1.0))
    assert torch.isfinite(x.grad).all()


def test_t_squared_keeps_the_soft_gradient_size_at_high_temperature():
    """Hinton §2: d(T²·KL)/ds → (s − t)/V (zero-mean logits) as T grows, independent of T."""
    s, t = rand((1, V), 7, 1.0), rand((1, V), 8, 1.0)
    s, t = s - s.mean(), t - t.mean()
    grads = []
    for T in (20.0, 200.0):
        x = s.clone().requires_grad_(True)
        D.kd_loss(x, t, None, T, alpha=1.0).backward()
        grads.append(x.grad)
    torch.testing.assert_close(grads[1], (s - t) / V, rtol=2e-2, atol=1e-5)
    torch.testing.assert_close(grads[0], grads[1], rtol=0.1, atol=1e-4)


@pytest.mark.parametrize("kw,msg", [({"temperature": 0.0}, "temperature"), ({"temperature": -1}, "temperature"),
                                    ({"alpha": 1.5}, "alpha"), ({"alpha": -0.1}, "alpha")])
def test_bad_temperature_and_alpha_raise_value_error(kw, msg):
    s = rand((2, V), 0)
    args = {"temperature": 1.0, "alpha": 0.5, **kw}
    with pytest.raises(ValueError, match=msg):
        D.kd_loss(s, s, torch.zeros(2, dtype=torch.long), **args)
    with pytest.raises(ValueError, match=msg):
        D.TrainConfig(**args)


def test_vocab_mismatch_raises_value_error():
    with pytest.raises(ValueError, match="vocabulary mismatch"):
        D.kd_loss(rand((2, V), 0), rand((2, V + 1), 1), None, 1.0, 1.0)
    t = rand((2, V + 3), 1)
    v, i = t.topk(5, -1)
    with pytest.raises(ValueError, match="vocabulary mismatch"):
        D.kd_loss(rand((2, V), 0), D.TopKLogits(v, i, V + 3), None, 1.0, 1.0)
    a = D.make_student(SimpleNamespace(vocab_size=64), hidden_size=16, intermediate_size=32)
    b = D.make_student(SimpleNamespace(vocab_size=80), hidden_size=16, intermediate_size=32)
    with pytest.raises(ValueError, match="vocabulary mismatch"):
        D.check_vocab(a, b)
    with pytest.raises(ValueError, match="labels are needed"):
        D.kd_loss(rand((2, V), 0), rand((2, V), 1), None, 1.0, 0.5)


# ---------------------------------------------------------------- a tiny teacher/student pair
TINY = dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, intermediate_size=32,
            max_position_embeddings=64)


@pytest.fixture(scope="module")
def pair():
    teacher = lk.models.tiny_llama(seed=1, vocab_size=V, hidden_size=32, num_hidden_layers=2,
                                   intermediate_size=64)
    seqs = torch.randint(0, V, (8, 17), generator=torch.Generator().manual_seed(0))
    return teacher, seqs


def test_student_shares_vocab_and_tying_dedups_the_embedding():
    tied = D.make_student(SimpleNamespace(vocab_size=1000), hidden_size=16, intermediate_size=32)
    untied = D.make_student(SimpleNamespace(vocab_size=1000), hidden_size=16, intermediate_size=32,
                            tie_word_embeddings=False)
    assert tied.config.vocab_size == 1000
    assert lk.count_params(untied) - lk.count_params(tied) == 1000 * 16
    assert tied.lm_head.weight.data_ptr() == tied.get_input_embeddings().weight.data_ptr()
    assert 0.5 < D.embedding_share(tied) < 1.0


def test_teacher_topk_matches_full_logits_and_is_cached(pair, tmp_path, monkeypatch):
    monkeypatch.setenv("LABKIT_CACHE", str(tmp_path))
    teacher, seqs = pair
    tk = XD.cached_teacher_topk(teacher, seqs, k=5, batch_size=3)
    with torch.no_grad():
        full = teacher(input_ids=seqs[:, :-1]).logits
    v, i = full.topk(5, -1)
    torch.testing.assert_close(tk.values, v, rtol=1e-5, atol=1e-5)
    assert tk.indices.dtype == torch.int32
    assert tk.nbytes == D.logit_cache_bytes(8 * 16, V, k=5, n_tail=len(D.TAIL_TEMPERATURES))
    rest = full.scatter(-1, i, float("-inf"))
    for j, T in enumerate(D.TAIL_TEMPERATURES):  # the tail is the exact log-mass of the other V − k tokens
        torch.testing.assert_close(tk.tail[..., j], (rest / T).logsumexp(-1), rtol=1e-5, atol=1e-5)
        share = torch.softmax(full / T, -1).topk(5, -1).values.sum(-1).mean().item()
        assert D.topk_mass(tk, T) == pytest.approx(share, rel=1e-4)
    path = XD.topk_cache_path(teacher, seqs, 5)
    assert path.exists() and str(tmp_path) in str(path)
    again = XD.cached_teacher_topk(teacher, seqs, k=5)
    assert torch.equal(again.values, tk.values)
    path.write_bytes(b"corrupt")  # a corrupt cache is rebuilt, never used
    assert torch.equal(XD.cached_teacher_topk(teacher, seqs, k=5).indices, tk.indices)


def test_batch_order_is_a_seeded_pure_function():
    a = D.batch_order(10, 7, 3, seed=1)
    assert a.shape == (7, 3) and torch.equal(a, D.batch_order(10, 7, 3, seed=1))
    assert sorted(a[:3].reshape(-1).tolist()) == sorted(set(a[:3].reshape(-1).tolist()))  # no repeat in an epoch


def _train(pair, tmp_path, alpha, steps=6, **kw):
    teacher, seqs = pair
    tk = D.teacher_topk(teacher, seqs, k=8)
    student = D.make_student(teacher.config, **TINY)
    cfg = D.TrainConfig(steps=steps, batch_size=2, lr=1e-2, warmup=2, alpha=alpha, temperature=2.0)
    hist = D.train_student(student, seqs, cfg, tk if alpha > 0 else None, progress=False, **kw)
    return student, hist


def test_training_lowers_the_loss_hard_and_distilled(pair, tmp_path):
    for alpha in (0.0, 1.0):
        _, hist = _train(pair, tmp_path, alpha, steps=12)
        assert len(hist["loss"]) == 12 and hist["loss"][-1] < hist["loss"][0]


def test_interrupted_run_resumes_to_the_same_weights(pair, tmp_path):
    ref, ref_hist = _train(pair, tmp_path, 0.5, steps=8)

    class Interrupt(Exception):
        pass

    def stop_after_5(step, hist):
        if step == 5:
            raise Interrupt

    ck = tmp_path / "run.pt"
    with pytest.raises(Interrupt):
        _train(pair, tmp_path, 0.5, steps=8, checkpoint=ck, checkpoint_every=2, callback=stop_after_5)
    state = D.load_checkpoint(ck)
    assert state["step"] == 4  # the last checkpoint before the interruption
    resumed, hist = _train(pair, tmp_path, 0.5, steps=8, checkpoint=ck, checkpoint_every=2)
    assert hist["loss"] == ref_hist["loss"]
    for (n, a), b in zip(ref.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), n
    assert not list(tmp_path.glob(".*.tmp"))  # atomic writes leave no temp files
    with pytest.raises(ValueError, match="another run"):
        _train(pair, tmp_path, 1.0, steps=8, checkpoint=ck)
    teacher, seqs = pair  # same config and data but other soft targets: never resumed against them
    other = D.teacher_topk(teacher, seqs, k=4)
    with pytest.raises(ValueError, match="another run"):
        D.train_student(D.make_student(teacher.config, **TINY), seqs,
                        D.TrainConfig(steps=8, batch_size=2, lr=1e-2, warmup=2, alpha=0.5, temperature=2.0),
                        other, checkpoint=ck, progress=False)


def test_softened_distribution_entropy_grows_with_temperature(pair):
    teacher, _ = pair
    class Tok:
        def __call__(self, text, return_tensors=None):
            return {"input_ids": torch.tensor([[1, 2, 3, 4]])}

        def decode(self, ids):
            return f"<{ids[0]}>"

    ents = [XD.softened_next_token(teacher, Tok(), "x", T)["entropy"] for T in (0.5, 1.0, 2.0, 8.0)]
    assert ents == sorted(ents) and ents[-1] < math.log(V) + 1e-6
    out = XD.softened_next_token(teacher, Tok(), "x", 1.0, top=3)
    assert len(out["tokens"]) == 3 and out["probs"] == sorted(out["probs"], reverse=True)
    with pytest.raises(ValueError, match="temperature"):
        XD.softened_next_token(teacher, Tok(), "x", 0)


def test_kv_cache_bytes_measured_matches_formula(pair):
    teacher, _ = pair
    c = teacher.config
    head_dim = c.hidden_size // c.num_attention_heads
    want = 2 * c.num_hidden_layers * c.num_key_value_heads * head_dim * 4 * 10
    assert XD.kv_cache_bytes_measured(teacher, 10) == want == lk.estimate_kv_cache_bytes(c, 1, 10)


def test_train_config_is_frozen_and_checks_types_and_ranges(pair):
    for kw, err in [({"alpha": "0.5"}, TypeError), ({"lr": -1}, ValueError), ({"steps": 1.5}, TypeError),
                    ({"batch_size": 0}, ValueError), ({"temperature": "2"}, TypeError), ({"lr": float("nan")}, ValueError),
                    ({"clip": -1.0}, ValueError), ({"seed": True}, TypeError)]:
        with pytest.raises(err):
            D.TrainConfig(**kw)
    cfg = D.TrainConfig(lr=1, alpha=1)
    assert isinstance(cfg.lr, float) and isinstance(cfg.alpha, float)
    with pytest.raises(Exception):
        cfg.lr = 0.1  # frozen
    teacher, seqs = pair
    with pytest.raises(ValueError, match="checkpoint_every"):
        D.train_student(D.make_student(teacher.config, **TINY), seqs, D.TrainConfig(steps=2), checkpoint_every=0,
                        progress=False)
    with pytest.raises(TypeError, match="k must be a whole number"):
        D.teacher_topk(teacher, seqs, k=2.5)


def test_a_flipped_byte_in_a_checkpoint_is_refused(pair, tmp_path):
    ck = tmp_path / "run.pt"
    _train(pair, tmp_path, 0.5, steps=4, checkpoint=ck, checkpoint_every=2)
    raw = bytearray(ck.read_bytes())
    raw[len(raw) // 2] ^= 0x40
    ck.write_bytes(bytes(raw))
    with pytest.raises(lk.repro.ChecksumError, match="delete"):
        _train(pair, tmp_path, 0.5, steps=8, checkpoint=ck, checkpoint_every=2)
    ck.with_name(ck.name + ".sha256.json").unlink()  # no checksum: not trusted either
    with pytest.raises(lk.repro.ChecksumError):
        D.load_checkpoint(ck)


def test_a_flipped_byte_in_the_topk_cache_is_rebuilt(pair, tmp_path, monkeypatch):
    monkeypatch.setenv("LABKIT_CACHE", str(tmp_path))
    teacher, seqs = pair
    tk = XD.cached_teacher_topk(teacher, seqs, k=5)
    path = XD.topk_cache_path(teacher, seqs, 5)
    raw = bytearray(path.read_bytes())
    raw[-200] ^= 0x01
    path.write_bytes(bytes(raw))
    again = XD.cached_teacher_topk(teacher, seqs, k=5)
    assert torch.equal(again.values, tk.values) and torch.equal(again.tail, tk.tail)
    assert lk.repro.read_verified(path, XD.TOPK_KIND, "")[0] == path.read_bytes()  # rebuilt and re-verified


def test_depth_student_keeps_the_teachers_layers_and_leaves_the_teacher_alone(pair):
    teacher, seqs = pair
    before = D.weights_sha256(teacher)
    same = D.make_depth_student(teacher, [0, 1], freeze_embedding=False)
    with torch.no_grad():
        torch.testing.assert_close(same(input_ids=seqs[:2, :-1]).logits, teacher(input_ids=seqs[:2, :-1]).logits)
    cut = D.make_depth_student(teacher, [1])
    assert len(cut.model.layers) == cut.config.num_hidden_layers == 1 and len(teacher.model.layers) == 2
    assert cut.model.layers[0].self_attn.layer_idx == 0
    assert torch.equal(cut.model.layers[0].mlp.up_proj.weight, teacher.model.layers[1].mlp.up_proj.weight)
    assert cut.lm_head.weight.data_ptr() == cut.get_input_embeddings().weight.data_ptr()  # still tied
    assert not cut.get_input_embeddings().weight.requires_grad
    assert lk.count_params(cut) == lk.memory.estimate_params(cut.config)["total"]
    assert XD.kv_cache_bytes_measured(cut, 4) == lk.estimate_kv_cache_bytes(cut.config, 1, 4)
    frozen = cut.get_input_embeddings().weight.clone()
    D.train_student(cut, seqs, D.TrainConfig(steps=3, batch_size=2, lr=1e-2, warmup=0), progress=False)
    assert torch.equal(cut.get_input_embeddings().weight, frozen)  # only the kept layers trained
    assert D.weights_sha256(teacher) == before
    for bad, err in [([2], ValueError), ([1, 0], ValueError), ([], ValueError), ("01", TypeError), ([0.5], TypeError)]:
        with pytest.raises(err):
            D.make_depth_student(teacher, bad)


def test_stop_at_follows_the_full_schedule(pair, tmp_path):
    _, full = _train(pair, tmp_path, 1.0, steps=6)
    _, part = _train(pair, tmp_path, 1.0, steps=6, stop_at=3)
    assert part["loss"] == full["loss"][:3] and part["lr"] == full["lr"][:3]


def test_lr_schedule_warms_up_then_decays_to_a_tenth():
    cfg = D.TrainConfig(steps=10, lr=1.0, warmup=2)
    lrs = [D.lr_at(s, cfg) for s in range(10)]
    assert lrs[:2] == [0.5, 1.0] and lrs[2] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[2:], lrs[3:])) and lrs[-1] > 0.1 and D.lr_at(10, cfg) == pytest.approx(0.1)


def test_lr_schedule_equals_the_hand_formula():
    """Linear warm-up to lr over `warmup` steps, then a cosine from lr down to lr/10 over the remaining steps."""
    cfg = D.TrainConfig(steps=100, lr=2e-3, warmup=10)
    hand = {0: 2e-4, 4: 1e-3, 9: 2e-3,                               # (step + 1) / warmup · lr
            10: 2e-3,                                                # cosine at 0: lr
            55: 2e-3 * (0.1 + 0.9 * 0.5),                            # half-way (45 of 90): the mean of lr and lr/10
            40: 2e-3 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 3))),   # a third of the way: 0.775 · lr
            99: 2e-3 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 89 / 90)))}
    for step, lr in hand.items():
        assert D.lr_at(step, cfg) == pytest.approx(lr, rel=1e-12), step
    assert D.lr_at(100, cfg) == pytest.approx(2e-4)                    # the schedule ends at a tenth
    no_warmup = D.TrainConfig(steps=5, lr=1.0, warmup=0)          # 0.1 + 0.45·(1 + cos(π·s/5))
    assert [D.lr_at(s, no_warmup) for s in range(5)] == pytest.approx([1.0, 0.914058, 0.689058, 0.410942, 0.185942],
                                                                      abs=1e-6)


def test_training_follows_the_schedule(pair, tmp_path):
    _, hist = _train(pair, tmp_path, 1.0, steps=6)
    cfg = D.TrainConfig(steps=6, batch_size=2, lr=1e-2, warmup=2, alpha=1.0, temperature=2.0)   # _train's
    assert hist["lr"] == [D.lr_at(s, cfg) for s in range(6)] and hist["lr"][:2] == [5e-3, 1e-2]


def test_experiment_summary_uses_the_labs_gap_metric_and_nearest_run():
    from labkit.experiments import distill as X
    s = X.summarize(10.0, [1000.0, 800.0, 900.0], [100.0, 90.0, 110.0], [300.0, 250.0, 350.0])
    assert s["ce_ppl_mean"] == 900.0 and s["kd_ppl_mean"] == 100.0 and s["ce_ppl_spread"] == 200.0
    assert s["gap_closed_pct"] == pytest.approx(100 * lk.evaluate.gap_closed(10.0, 900.0, 100.0), abs=0.05)
    assert s["kd_better_every_seed"] and s["kd_better_than_early_stopped_ce_every_seed"]
    res = {"grid_seed0": {"ce": {"alpha": 0.0, "temperature": 1.0}, "kd_a1_T1": {"alpha": 1.0, "temperature": 1.0},
                          "kd_a1_T2": {"alpha": 1.0, "temperature": 2.0}}}
    assert X.nearest_run(res, 1.0, 2.5) == "kd_a1_T2" and X.nearest_run(res, 0.1, 4.0) == "ce"
    with pytest.raises(TypeError):
        X.nearest_run(res, "1", 1.0)
    with pytest.raises(TypeError):
        X.Experiment(train={"steps": 3})
