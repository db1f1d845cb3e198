"""Tests for labkit.training: sharing, checkpointing, accumulation, precision, optimizer state, estimates."""
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dataclasses import replace

from labkit import training as T
from labkit.memory import count_params, estimate_params
from labkit.models import LlamaSpec

SMALL = LlamaSpec(hidden_size=64, num_hidden_layers=4, intermediate_size=128, tie_word_embeddings=False)


def _grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _x(batch=4, seq=16, seed=0):
    return torch.randint(0, 256, (batch, seq), generator=torch.Generator().manual_seed(seed))


def test_count_matches_model():
    for cfg in (SMALL, T.SMALL, replace(T.SMALL, tie_word_embeddings=True, num_hidden_layers=2)):
        assert estimate_params(cfg)["total"] == count_params(T.small_llama(cfg))


def test_share_ties_storage_and_counts_params():
    model = T.small_llama(SMALL)
    per_layer = sum(p.numel() for p in model.model.layers[0].parameters())
    before = count_params(model)
    T.share_(model, T.ShareConfig(group_size=2))
    layers = model.model.layers
    assert layers[1].mlp.up_proj.weight is layers[0].mlp.up_proj.weight
    assert layers[2].mlp.up_proj.weight is not layers[0].mlp.up_proj.weight
    assert layers[3].self_attn.q_proj.weight.data_ptr() == layers[2].self_attn.q_proj.weight.data_ptr()
    assert count_params(model) == before - 2 * per_layer
    from labkit.memory import model_bytes, tensor_bytes
    assert model_bytes(model) == 4 * count_params(model) + tensor_bytes(list(model.buffers()))  # + RoPE table


def test_shared_layers_get_the_sum_of_their_gradients():
    """A weight used by two layers gets one gradient: the sum of what each use contributes (checked by
    comparing with an unshared copy whose two layers start from the same weights)."""
    shared = T.share_(T.small_llama(SMALL), T.ShareConfig(group_size=4))
    ref = T.small_llama(SMALL)
    for i in range(4):  # give the reference the same (repeated) weights, unshared
        ref.model.layers[i].load_state_dict(shared.model.layers[0].state_dict())
    x = _x()
    T.accumulate_grads(shared, x)
    T.accumulate_grads(ref, x)
    g_shared = shared.model.layers[0].mlp.down_proj.weight.grad
    g_sum = sum(ref.model.layers[i].mlp.down_proj.weight.grad for i in range(4))
    torch.testing.assert_close(g_shared, g_sum, rtol=1e-4, atol=1e-6)


def test_share_filter_and_bad_group():
    model = T.small_llama(SMALL)
    T.share_(model, T.ShareConfig(group_size=4), filter_fn=lambda m, fqn: fqn.startswith("mlp"))
    layers = model.model.layers
    assert layers[3].mlp.gate_proj.weight is layers[0].mlp.gate_proj.weight
    assert layers[3].self_attn.q_proj.weight is not layers[0].self_attn.q_proj.weight
    for bad, err in ((0, ValueError), (5, ValueError), (1.5, TypeError), ("2", TypeError)):
        with pytest.raises(err, match="group_size"):   # 0, 1.5, "2": when the config is made; 5 > depth 4: in share_
            T.share_(T.small_llama(SMALL), T.ShareConfig(group_size=bad))
    with pytest.raises(TypeError, match="ShareConfig"):
        T.share_(T.small_llama(SMALL), 2)


def test_tie_and_untie():
    model = T.small_llama(replace(SMALL, num_hidden_layers=2, tie_word_embeddings=True))
    from labkit.memory import model_bytes
    assert T.is_tied(model)
    before = model_bytes(model)
    T.untie_(model)
    assert not T.is_tied(model)
    assert model_bytes(model) - before == 256 * 64 * 4
    x = _x()
    T.accumulate_grads(model, x)  # still trains; the two copies now get separate gradients
    assert model.lm_head.weight.grad is not model.model.embed_tokens.weight.grad


@pytest.mark.parametrize("every", ["every", "sqrt", 2, 3, 4])
def test_checkpointing_gives_the_same_loss_and_gradients(every):
    model = T.small_llama(SMALL)
    x = _x()
    loss0 = T.accumulate_grads(model, x)
    g0 = _grads(model)
    model.zero_grad(set_to_none=True)
    T.checkpoint_(model, every)
    loss1 = T.accumulate_grads(model, x)
    assert loss1 == pytest.approx(loss0, abs=1e-6)
    for n, g in _grads(model).items():
        torch.testing.assert_close(g, g0[n], rtol=1e-5, atol=1e-7)
    with torch.no_grad():  # eval / no grad: plain forward, same output
        torch.testing.assert_close(model(input_ids=x).logits, T.checkpoint_(model, "none")(input_ids=x).logits)


def test_checkpointing_cuts_saved_activations():
    """The forward of a checkpointed model keeps almost nothing for backward (measured with hooks)."""
    model = T.small_llama(SMALL)
    x = _x(4, 64)
    full = T.saved_activation_bytes(model, x)
    T.checkpoint_(model, "every")
    assert T.saved_activation_bytes(model, x) < 0.35 * full


def test_checkpoint_interval_errors():
    model = T.small_llama(SMALL)
    for bad in (0.5, "half", 5, -1, True):
        with pytest.raises(ValueError, match="checkpoint"):
            T.checkpoint_(model, bad)
    assert T.resolve_interval("sqrt", 16) == 4 and T.resolve_interval("every", 16) == 1
    assert T.resolve_interval("none", 16) is None and T.sqrt_interval(30) == 5


@pytest.mark.parametrize("micro", [2, 4])
def test_gradient_accumulation_equals_the_full_batch(micro):
    model = T.small_llama(SMALL)
    x = _x(8)
    loss_full = T.accumulate_grads(model, x)
    g0 = _grads(model)
    model.zero_grad(set_to_none=True)
    loss_acc = T.accumulate_grads(model, x, micro_batches=micro)
    assert loss_acc == pytest.approx(loss_full, abs=1e-5)
    for n, g in _grads(model).items():
        torch.testing.assert_close(g, g0[n], rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="micro-batches"):
        T.accumulate_grads(model, x, micro_batches=3)


def test_accumulation_saves_activation_memory():
    model = T.small_llama(SMALL)
    x = _x(8, 32)
    full = T.saved_activation_bytes(model, x)
    part = T.saved_activation_bytes(model, x[:2])
    assert part < 0.3 * full


def _saved_per_layer(batch, seq, precision):
    """Bytes autograd saves for one decoder layer (a 3-layer minus a 2-layer model) and a layer's matrix
    parameters."""
    x, b = _x(batch, seq), {}
    for layers in (2, 3):
        m = T.small_llama(replace(SMALL, num_hidden_layers=layers))
        b[layers] = T.saved_activation_bytes(m, x, precision)
    return b[3] - b[2], sum(p.numel() for p in m.model.layers[0].parameters() if p.dim() == 2)


def test_layer_activation_formula_matches_saved_tensors_fp32():
    """The counted fp32 formula equals the measured bytes per layer exactly."""
    for batch, seq in ((2, 16), (4, 32)):
        assert _saved_per_layer(batch, seq, "fp32")[0] == T.layer_activation_bytes(SMALL, batch, seq, "fp32")


def test_layer_activation_formula_bf16_within_15_percent():
    saved, layer_params = _saved_per_layer(4, 32, "bf16")
    measured = saved - 2 * layer_params  # minus the bf16 weight copies autocast saves
    est = T.layer_activation_bytes(SMALL, 4, 32, "bf16")
    assert abs(measured - est) <= 0.15 * measured
    assert est < T.layer_activation_bytes(SMALL, 4, 32, "fp32")


def test_bf16_training_tracks_fp32_and_keeps_fp32_masters():
    # one batch seen six times: learnable (uniform random tokens are not: their loss stays at ln 256)
    data = torch.randint(0, 256, (1, 4, 32), generator=torch.Generator().manual_seed(1)).repeat(6, 1, 1)
    curves = {}
    for p in ("fp32", "bf16"):
        model = T.small_llama(SMALL)
        curves[p] = T.train(model, data, lr=3e-3, precision=p)
        assert all(q.dtype == torch.float32 for q in model.parameters())
    assert curves["fp32"][-1] < curves["fp32"][0]
    assert max(abs(a - b) for a, b in zip(curves["fp32"], curves["bf16"])) < 0.05
    with pytest.raises(ValueError, match="precision"):
        T.autocast("fp16")


def test_optimizer_state_bytes_and_estimates():
    model = T.small_llama(SMALL)
    opt = torch.optim.Adam(model.parameters())
    state = T.state_after_step(model, opt, _x())
    n = count_params(model)
    n_tensors = len(list(model.parameters()))
    assert state == T.optimizer_state_bytes(opt) == 8 * n + 4 * n_tensors  # two fp32 moments + a step each
    est = T.optimizer_estimates(model)
    assert est["adam_fp32"] == 8 * n
    assert est["adam_4bit"] < est["adam_8bit"] < 0.5 * est["adam_fp32"]   # small tensors stay fp32 in low-bit Adam
    assert est["adafactor"] < 0.2 * est["adam_fp32"]
    big = T.optimizer_estimates(torch.nn.Linear(512, 512))
    # weight: 8-bit codes + an fp32 scale per 256 values + a 256-entry fp32 code map; bias (512 < 4,096) fp32
    assert big["adam_8bit"] == 2 * (512 * 512 + 4 * 1024 + 4 * 256) + 2 * 4 * 512
    assert big["adam_4bit"] == 2 * (512 * 512 // 2 + 4 * 2048 + 4 * 16) + 2 * 4 * 512


def test_adafactor_state_matches_factored_estimate():
    """torch.optim.Adafactor keeps row and column statistics for matrices: measured vs the estimate."""
    model = T.small_llama(SMALL)
    measured = T.state_after_step(model, torch.optim.Adafactor(model.parameters()), _x())
    est = T.optimizer_estimates(model)["adafactor"]
    n_tensors = len(list(model.parameters()))
    assert abs(measured - est) <= 4 * n_tensors  # the scalar step per tensor


def test_estimate_stack_zero_stages_and_errors():
    n, cfg = 1_000_000, SMALL
    s0 = T.estimate_stack(n, cfg, zero_stage=0, ranks=4)
    assert (s0["params"], s0["grads"], s0["optimizer"]) == (4 * n, 4 * n, 8 * n)
    s1 = T.estimate_stack(n, cfg, zero_stage=1, ranks=4)
    assert s1["optimizer"] == 2 * n and s1["grads"] == 4 * n
    s2 = T.estimate_stack(n, cfg, zero_stage=2, ranks=4)
    assert s2["grads"] == n
    s3 = T.estimate_stack(n, cfg, zero_stage=3, ranks=4)
    assert s3["params"] == n
    assert sum(v for k, v in s3.items() if k != "activations") == 16 * n // 4
    with pytest.raises(ValueError, match="stage"):
        T.estimate_stack(n, cfg, zero_stage=4)
    with pytest.raises(ValueError, match="ranks"):
        T.estimate_stack(n, cfg, ranks=0)
    with pytest.raises(ValueError, match="depth"):
        T.estimate_stack(n, cfg, checkpoint=cfg.num_hidden_layers + 1)
    with pytest.raises(ValueError, match="precision"):
        T.estimate_stack(n, cfg, precision="int8")


@settings(max_examples=40, deadline=None)
@given(layers=st.integers(1, 64), k=st.integers(1, 64))
def test_checkpoint_estimate_invariants(layers, k):
    cfg = replace(T.SMALL, num_hidden_layers=layers)
    if k > layers:
        with pytest.raises(ValueError):
            T.activation_bytes(cfg, 4, 128, checkpoint=k)
        return
    none = T.activation_bytes(cfg, 4, 128)
    ck = T.activation_bytes(cfg, 4, 128, checkpoint=k)
    assert ck <= none + cfg.hidden_size * 4 * 4 * 128  # never worse than keeping everything (+1 input)
    best = min(T.activation_bytes(cfg, 4, 128, checkpoint=j) for j in range(1, layers + 1))
    assert best <= ck


def test_sqrt_segments_minimise_when_layers_keep_as_much_as_their_input():
    """Chen et al.: with per-layer memory ≈ the stored input, n/k + k is smallest at k = √n."""
    n = 64
    cost = {k: math.ceil(n / k) + k for k in range(1, n + 1)}
    assert min(cost, key=cost.get) == T.sqrt_interval(n)


def test_measure_step_runs_in_process():
    cfg = {**T.asdict(SMALL), "batch": 2, "seq_len": 16}
    r = T.measure_step(cfg, {"a": {"checkpoint": "none"}, "b": {"checkpoint": "every", "precision": "bf16"}})
    assert set(r["variants"]) == {"a", "b"} and r["n_params"] == estimate_params(SMALL)["total"]
    assert r["optimizer_state_bytes"] == 8 * r["n_params"] + 4 * len(list(T.small_llama(SMALL).parameters()))


def test_time_variants_times_each_variants_step(monkeypatch):
    """With a clock that ticks once per MLP forward (one per decoder layer run), a step's "time" is the layers it runs: 4 without
    checkpointing, 8 when every layer is recomputed in the backward pass (the price of checkpointing)."""
    from types import SimpleNamespace
    ticks = {"n": 0}
    build = T.small_llama

    def counted(*a, **k):
        model = build(*a, **k)
        for layer in model.model.layers:
            layer.mlp.register_forward_hook(lambda *_: ticks.__setitem__("n", ticks["n"] + 1))
        return model
    monkeypatch.setattr(T, "small_llama", counted)
    monkeypatch.setattr(T, "time", SimpleNamespace(perf_counter=lambda: ticks["n"]))
    threads = torch.get_num_threads()
    t = T.time_variants({"none": {}, "every": {"checkpoint": "every"}, "sqrt": {"checkpoint": "sqrt"}}, SMALL,
                        batch=2, seq_len=16, repeats=3)
    assert t == {"none": 4, "every": 8, "sqrt": 8} and torch.get_num_threads() == threads


@pytest.mark.parametrize("every, runs", [("none", 1), ("sqrt", 2), ("every", 2), (3, 2)])
def test_layer_forwards_counts_the_recomputation(every, runs):
    model = T.small_llama(SMALL)                     # 4 layers
    x = torch.randint(0, 256, (1, 16), generator=torch.Generator().manual_seed(0))
    T.checkpoint_(model, 2)
    assert T.layer_forwards(model, x, every) == runs * SMALL.num_hidden_layers
    assert model._labkit_checkpoint_every == 2 and all(p.grad is None for p in model.parameters())


def test_batches_are_windows_of_the_tokens():
    tok = torch.arange(1000)
    b = T.batches(tok, 3, 2, 10, seed=0)
    assert b.shape == (3, 2, 10)
    assert torch.equal(b[..., 1:] - b[..., :-1], torch.ones(3, 2, 9, dtype=torch.long))
    with pytest.raises(ValueError):
        T.batches(torch.arange(5), 1, 1, 10)


def test_step_estimate_orders_the_variants_and_spec_from_hf(tiny):
    cfg, n = T.SMALL, estimate_params(T.SMALL)["total"]
    est = {k: T.step_estimate(cfg, n, 4, 128, **v) for k, v in T.STEP_VARIANTS.items()}
    assert est["ckpt_every"] < est["ckpt_sqrt"] < est["bf16"] < est["fp32"]
    c = LlamaSpec.from_hf(tiny.config)
    assert (c.num_hidden_layers, c.hidden_size, c.tie_word_embeddings) == (2, 64, True)
    assert estimate_params(c)["total"] == count_params(tiny) and c.to_hf().to_dict() == tiny.config.to_dict()
    assert estimate_params(T.MODEL_CONFIGS["SmolLM2-135M"])["total"] == 134_515_008


@pytest.mark.slow
@pytest.mark.parametrize("bits", [8, 4])
def test_torchao_lowbit_adam_state_matches_estimate_and_tracks_adamw(bits):
    """torchao's AdamW8bit / AdamW4bit on a CPU: state bytes (codes + block scales + code map, small tensors in
    fp32) equal optimizer_estimates, and three steps land close to torch.optim.AdamW's weights."""
    torch.manual_seed(0)
    model = T.small_llama(SMALL)
    ref = T.small_llama(SMALL)
    ref.load_state_dict(model.state_dict())
    opt = T.lowbit_adam(model.parameters(), bits, lr=1e-3)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-3)
    x = _x()
    for _ in range(3):
        state = T.state_after_step(model, opt, x)
        T.state_after_step(ref, ref_opt, x)
    n_tensors = len(list(model.parameters()))
    est = T.optimizer_estimates(model)
    assert state == est[f"adam_{bits}bit"] + 4 * n_tensors          # + a 4-byte step counter per tensor
    assert est["adam_4bit"] < est["adam_8bit"] < 0.5 * est["adam_fp32"]   # tiny model: many tensors stay fp32
    moved = max(float((a - b).abs().max()) for a, b in zip(model.parameters(), ref.parameters()))
    assert moved < 1e-3 * 3                                          # within the three steps' lr
    with pytest.raises(ValueError, match="bits"):
        T.lowbit_adam(model.parameters(), 3)


def test_designs_train_the_same_model_and_measure_each_rank():
    """The signature chart's runs (notebook 06 §5): a single-process design and a two-rank one end with the same
    validation loss (the same updates), and every rank reports its own peak."""
    from labkit.experiments import training as X
    from labkit.models import LlamaSpec
    spec = LlamaSpec(hidden_size=64, num_hidden_layers=2, intermediate_size=128, tie_word_embeddings=False)
    out = X.designs(steps=3, batch=4, seq_len=32, names=["fp32 Adam", "ZeRO-1 × 2 ranks"], spec=spec)
    one, two = out["runs"]["fp32 Adam"], out["runs"]["ZeRO-1 × 2 ranks"]
    assert len(one["peak_bytes_per_rank"]) == 1 and len(two["peak_bytes_per_rank"]) == 2
    assert all(b > 0 for b in one["peak_bytes_per_rank"] + two["peak_bytes_per_rank"])
    assert abs(one["val_loss"] - two["val_loss"]) < 1e-5 and len(one["train_losses"]) == 3
    assert out["config"]["hidden_size"] == 64 and out["steps"] == 3


def test_designs_refuse_an_unknown_name_before_starting_any_process():
    from labkit.experiments import training as X
    with pytest.raises(ValueError, match="unknown design.*choose from"):
        X.designs(names=["fp32 Adam", "fp16 Adam"])
