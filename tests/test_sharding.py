"""Tests for labkit.sharding: the local gloo launcher (results, failures, cleanup) and ZeRO-1 / FSDP2."""
import time

import psutil
import pytest
import torch

from labkit import sharding


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _our_children() -> set[int]:
    """Child processes other than multiprocessing's resource tracker (a long-lived helper by design)."""
    out = set()
    for c in psutil.Process().children(recursive=True):
        try:
            if "resource_tracker" not in " ".join(c.cmdline()):
                out.add(c.pid)
        except psutil.NoSuchProcess:
            pass
    return out


def _assert_no_strays(before: set[int]):
    assert len(sharding.LAST_PIDS) > 0
    assert not any(_alive(p) for p in sharding.LAST_PIDS), "a rank is still alive"
    assert _our_children() <= before, "stray child processes left behind"


def test_free_port_is_bindable():
    import socket
    port = sharding.free_port()
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))


def test_launch_rejects_unimportable_and_bad_world_size():
    with pytest.raises(TypeError, match="importable module"):
        sharding.launch(lambda rank, world: rank, 2)

    def local(rank, world):
        return rank
    with pytest.raises(TypeError, match="importable"):
        sharding.launch(local, 2)
    with pytest.raises(ValueError, match="world_size"):
        sharding.launch(sharding.sleeping_worker, 0)
    with pytest.raises(ValueError, match="cannot be split evenly over 3 ranks"):
        sharding.compare_sharded(3)  # the default batch is 4


def test_zero1_and_fsdp_match_one_process_and_shard_state():
    before = _our_children()
    out = sharding.compare_sharded(2, modes=("zero1", "fsdp"))
    _assert_no_strays(before)
    full = out["single"]["optimizer_state_bytes"]
    n = out["n_params"]
    # Adam: exp_avg + exp_avg_sq = 8 bytes/param, plus a 4-byte step per parameter tensor
    assert 8 * n <= full <= 8 * n + 4 * 64
    for mode in ("zero1", "fsdp"):
        per_rank = out[mode]["optimizer_state_bytes"]
        assert len(per_rank) == 2
        formula = sharding.zero_state_bytes(n, 2, stage=1)
        for b in per_rank:  # each rank holds about half (ZeRO gives whole tensors to ranks: allow 10%)
            assert abs(b - formula) <= 0.1 * formula, (mode, per_rank, formula)
        assert sum(per_rank) >= 8 * n
        assert out[mode]["max_weight_diff"] < 1e-4
        assert out[mode]["losses"] == pytest.approx(out["single"]["losses"], abs=1e-4)
    # FSDP also shards the parameters; ZeRO-1 keeps them whole on every rank
    assert out["fsdp"]["param_bytes"][0] == pytest.approx(out["single"]["param_bytes"] / 2, rel=0.05)
    assert out["zero1"]["param_bytes"][0] == out["single"]["param_bytes"]


@pytest.mark.parametrize("how", ["raise", "exit", "abort"])
def test_a_failing_rank_ends_every_rank_and_is_named(how):
    before = _our_children()
    t = time.monotonic()
    with pytest.raises(sharding.RankFailedError) as e:
        sharding.launch(sharding.failing_worker, 2, args=(1, how), timeout=120)
    assert e.value.rank == 1
    assert "rank 1" in str(e.value)
    if how == "raise":
        assert "told to fail" in str(e.value)
    if how == "abort":  # a C++-style crash: the signal and what the rank wrote to fd 2 are reported
        assert "SIGABRT" in str(e.value) and "simulated C++ abort" in str(e.value)
    assert time.monotonic() - t < 100  # rank 0 was blocked in a barrier: it must have been stopped
    _assert_no_strays(before)


def test_timeout_stops_every_rank():
    before = _our_children()
    with pytest.raises(TimeoutError, match="stopped"):
        sharding.launch(sharding.sleeping_worker, 2, args=(120.0,), timeout=1.0)
    _assert_no_strays(before)


def test_zero_formula_and_bad_input():
    assert sharding.zero_state_bytes(1000, 4, stage=0) == 8000
    assert sharding.zero_state_bytes(1000, 4, stage=1) == 2000
    with pytest.raises(ValueError, match="stage"):
        sharding.zero_state_bytes(1000, 2, stage=4)
    with pytest.raises(ValueError, match="ranks"):
        sharding.zero_state_bytes(1000, 0)


def test_zero_formula_is_the_one_estimator():
    from labkit import memory
    for stage in range(4):
        parts = memory.estimate_training_bytes(10_000, "fp32", "adam", zero_stage=stage, ranks=4)
        assert sharding.zero_state_bytes(10_000, 4, stage) == parts["optimizer_state"]
        assert parts["weights"] == (10_000 if stage == 3 else 40_000)
        assert parts["gradients"] == (10_000 if stage >= 2 else 40_000)
    mixed = memory.estimate_training_bytes(1000, "mixed", zero_stage=1, ranks=2)
    assert mixed == {"weights": 2000, "gradients": 2000, "master_weights": 2000, "optimizer_state": 4000, "total": 10000}


def test_max_weight_diff():
    a = {"w": torch.ones(3)}
    assert sharding.max_weight_diff(a, {"w": torch.ones(3) + 1e-3}) == pytest.approx(1e-3, rel=1e-3)
    with pytest.raises(ValueError, match="keys"):
        sharding.max_weight_diff(a, {"v": torch.ones(3)})
