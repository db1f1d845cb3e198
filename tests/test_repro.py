"""labkit.repro: threads, the one timer, and the one checksum manifest (single files and folders)."""
import json

import pytest
import torch
from hypothesis import given, settings, strategies as st

from labkit import repro


def test_threads_restores_the_setting_even_on_error():
    before = torch.get_num_threads()
    with pytest.raises(RuntimeError):
        with repro.threads(1):
            assert torch.get_num_threads() == 1
            raise RuntimeError("boom")
    assert torch.get_num_threads() == before
    for bad, err in ((0, ValueError), (-1, ValueError), (1.5, TypeError), (True, TypeError), ("2", TypeError)):
        with pytest.raises(err):
            with repro.threads(bad):
                pass


def test_time_call_is_positive_and_orders_work():
    small, big = torch.randn(64, 64), torch.randn(512, 512)
    t_small = repro.time_call(torch.mm, small, small, min_run_time=0.05)
    t_big = repro.time_call(torch.mm, big, big, min_run_time=0.05)
    assert 0 < t_small < t_big  # 512³ is 512× the work of 64³
    with pytest.raises(TypeError):
        repro.time_call(42)


def test_write_verified_round_trip_and_refusals(tmp_path):
    p = tmp_path / "cache.bin"
    repro.write_verified(p, b"hello world", kind="test-cache", meta={"k": 3})
    data, meta = repro.read_verified(p, "test-cache", fix="rebuild it")
    assert data == b"hello world" and meta == {"k": 3}
    with pytest.raises(repro.ChecksumError, match="not a other-kind"):
        repro.read_verified(p, "other-kind", fix="rebuild it")
    p.write_bytes(b"hello worle")
    with pytest.raises(repro.ChecksumError, match="rebuild it"):
        repro.read_verified(p, "test-cache", fix="rebuild it")
    (tmp_path / "cache.bin.sha256.json").unlink()
    with pytest.raises(repro.ChecksumError, match="no checksum file"):
        repro.read_verified(p, "test-cache", fix="rebuild it")


@settings(max_examples=40, deadline=None)
@given(st.binary(min_size=1, max_size=300), st.data())
def test_any_flipped_byte_is_detected(tmp_path_factory, payload, data):
    folder = tmp_path_factory.mktemp("flip")
    p = folder / "f.bin"
    repro.write_verified(p, payload, kind="k")
    i = data.draw(st.integers(0, len(payload) - 1))
    flip = data.draw(st.integers(1, 255))
    bad = bytearray(payload)
    bad[i] ^= flip
    p.write_bytes(bytes(bad))
    with pytest.raises(repro.ChecksumError):
        repro.read_verified(p, "k", fix="x")


def test_manifest_verifies_every_file_and_its_kind(tmp_path):
    (tmp_path / "a.bin").write_bytes(b"a" * 10)
    (tmp_path / "b.txt").write_text("bee")
    m = repro.write_manifest(tmp_path, kind="demo-export")
    assert set(m["files"]) == {"a.bin", "b.txt"}
    assert repro.read_manifest(tmp_path, "demo-export", fix="re-export")["files"] == m["files"]
    with pytest.raises(repro.ChecksumError, match="not a labkit other"):
        repro.read_manifest(tmp_path, "other", fix="re-export")
    (tmp_path / "b.txt").write_text("bed")
    with pytest.raises(repro.ChecksumError, match="b.txt"):
        repro.read_manifest(tmp_path, "demo-export", fix="re-export")
    (tmp_path / "b.txt").unlink()
    with pytest.raises(repro.ChecksumError, match="missing"):
        repro.read_manifest(tmp_path, "demo-export", fix="re-export")
    man = json.loads((tmp_path / "labkit-manifest.json").read_text())
    man["files"] = {"../escape": {"bytes": 1, "sha256": "0"}}
    (tmp_path / "labkit-manifest.json").write_text(json.dumps(man))
    with pytest.raises(repro.ChecksumError, match="outside its folder"):
        repro.read_manifest(tmp_path, "demo-export", fix="re-export")


def test_replace_folder_swaps_whole_folders(tmp_path):
    dest, tmp = tmp_path / "out", tmp_path / ".out.tmp"
    dest.mkdir()
    (dest / "old.txt").write_text("old")
    tmp.mkdir()
    (tmp / "new.txt").write_text("new")
    repro.replace_folder(tmp, dest)
    assert [p.name for p in dest.iterdir()] == ["new.txt"] and not tmp.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_verified_torch_files_and_interrupts_held_until_both_are_written(tmp_path, monkeypatch):
    import os
    import signal
    path = tmp_path / "state.pt"
    state = {"w": torch.arange(6.0).reshape(2, 3), "step": 3, "name": "run"}
    real = repro.write_verified

    def interrupted(*a, **k):              # Ctrl-C arrives while the first of the two files is being written
        os.kill(os.getpid(), signal.SIGINT)
        return real(*a, **k)
    monkeypatch.setattr(repro, "write_verified", interrupted)
    with pytest.raises(KeyboardInterrupt):
        repro.write_verified_torch(path, state, "test-state", {"step": 3})
    back, meta = repro.read_verified_torch(path, "test-state", "rebuild it")   # both files were written
    assert torch.equal(back["w"], state["w"]) and back["step"] == 3 and meta == {"step": 3}
    b = bytearray(path.read_bytes())
    b[len(b) // 2] ^= 1
    path.write_bytes(bytes(b))
    with pytest.raises(repro.ChecksumError, match="rebuild it"):
        repro.read_verified_torch(path, "test-state", "rebuild it")
