"""Tests for labkit.storage: chunked sparse safetensors checkpoints, full and lazy loading, checksums."""
import json

import pytest
import torch

import labkit as lk
from labkit import storage as ST


@pytest.fixture(scope="module")
def pruned_tiny():
    model = lk.models.tiny_llama(seed=0)
    lk.prune.prune_(model, lk.prune.PruneConfig(method="nm", n=2, m=4))
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(ids).logits
    return model, ids, ref


@pytest.mark.parametrize("fmt", ["bitmap", "csr32", "coo", "bsr", "2:4", "dense"])
def test_full_and_lazy_load_give_the_same_logits(pruned_tiny, tmp_path, fmt):
    model, ids, ref = pruned_tiny
    index = ST.save_sparse(model, tmp_path, fmt=fmt, chunk_bytes=30_000)
    assert len(index["files"]) > 1                                    # really sharded
    assert index["aliases"] == {"lm_head.weight": "model.embed_tokens.weight"}
    on_disk = json.loads((tmp_path / "index.json").read_text())
    assert set(on_disk["files"]) == {p.name for p in tmp_path.glob("chunk-*.safetensors")}
    for loader in (ST.load_full, ST.load_lazy):
        m2 = loader(tmp_path)
        with torch.no_grad():
            assert torch.equal(m2(ids).logits, ref)
            assert torch.equal(m2(ids).logits, ref)                    # lazy: layers reload on each forward
    lazy = ST.load_lazy(tmp_path)
    assert all(p.device.type == "meta" for p in lazy.model.layers.parameters())  # nothing held between calls


def test_sparse_formats_are_smaller_on_disk(pruned_tiny, tmp_path):
    model = pruned_tiny[0]
    sizes = {f: ST.checkpoint_bytes(ST.save_sparse(model, tmp_path / f, fmt=f) and tmp_path / f)
             for f in ("dense", "2:4", "bitmap", "coo")}
    assert sizes["2:4"] < sizes["dense"] and sizes["bitmap"] < sizes["dense"] < sizes["coo"]


def test_state_dict_matches_model(pruned_tiny, tmp_path):
    model = pruned_tiny[0]
    ST.save_sparse(model, tmp_path, fmt="2:4")
    sd = ST.SparseCheckpoint.open(tmp_path).state_dict()
    for k, v in model.state_dict().items():
        assert torch.equal(sd[k], v), k


def test_corrupted_chunk_gives_a_clear_error(pruned_tiny, tmp_path):
    ST.save_sparse(pruned_tiny[0], tmp_path, fmt="bitmap", chunk_bytes=30_000)
    victim = sorted(tmp_path.glob("chunk-*.safetensors"))[1]
    data = bytearray(victim.read_bytes())
    data[-3] ^= 0xFF
    victim.write_bytes(bytes(data))
    for loader in (ST.load_full, lambda f: ST.load_lazy(f)(torch.zeros(1, 4, dtype=torch.long))):
        with pytest.raises(ST.ChecksumError, match=rf"checksum mismatch: .*{victim.name}.*re-save"):
            loader(tmp_path)


def test_missing_files_and_bad_folders(pruned_tiny, tmp_path):
    with pytest.raises(FileNotFoundError, match="index.json is missing"):
        ST.load_full(tmp_path)
    ST.save_sparse(pruned_tiny[0], tmp_path, fmt="bitmap", chunk_bytes=30_000)
    sorted(tmp_path.glob("chunk-*.safetensors"))[0].unlink()
    with pytest.raises(ST.ChecksumError, match="is missing"):
        ST.load_full(tmp_path)
    with pytest.raises(ValueError, match="data/"):
        ST.save_sparse(pruned_tiny[0], lk.repro.REPO_ROOT / "data" / "x")
    with pytest.raises(ValueError, match="unknown format"):
        ST.save_sparse(pruned_tiny[0], tmp_path, fmt="ell")


def test_two_four_needs_a_two_four_model(tmp_path):
    model = lk.models.tiny_llama(seed=1)                                # dense: not 2:4
    with pytest.raises(ValueError, match="not 2:4 sparse"):
        ST.save_sparse(model, tmp_path, fmt="2:4")


def test_checksum_error_is_the_one_of_lk_repro():
    assert ST.ChecksumError is lk.repro.ChecksumError


def _snapshot(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_a_failed_save_leaves_the_old_checkpoint_intact(pruned_tiny, tmp_path, monkeypatch):
    model = pruned_tiny[0]
    ST.save_sparse(model, tmp_path / "ck", fmt="bitmap", chunk_bytes=30_000)
    before = _snapshot(tmp_path / "ck")
    with pytest.raises(ValueError, match="not 2:4 sparse"):          # fails while encoding
        ST.save_sparse(lk.models.tiny_llama(seed=1), tmp_path / "ck", fmt="2:4")
    import safetensors.torch
    calls = []

    def dies(*a, **k):                                                # fails half-way through writing chunks
        calls.append(1)
        if len(calls) == 2:
            raise OSError("disk full")
        return real(*a, **k)
    real = safetensors.torch.save_file
    monkeypatch.setattr(safetensors.torch, "save_file", dies)
    with pytest.raises(OSError, match="disk full"):
        ST.save_sparse(model, tmp_path / "ck", fmt="csr32", chunk_bytes=30_000)
    monkeypatch.undo()
    import labkit.repro as R
    real_replace, n = R.os.replace, []

    def interrupted(a, b):                                            # Ctrl-C between the two renames of the swap
        n.append(1)
        if len(n) == 3:                                               # 1 index.json, 2 old aside, 3 new in
            raise KeyboardInterrupt()
        return real_replace(a, b)
    monkeypatch.setattr(R.os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        ST.save_sparse(model, tmp_path / "ck", fmt="coo", chunk_bytes=30_000)
    monkeypatch.undo()
    assert len(n) == 4                                                # the fourth rename put the old folder back
    assert _snapshot(tmp_path / "ck") == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]       # no temporary folder left behind
    ST.SparseCheckpoint.open(tmp_path / "ck").verify()
    ST.save_sparse(model, tmp_path / "ck", fmt="2:4")                 # a labkit checkpoint may be replaced
    assert ST.SparseCheckpoint.open(tmp_path / "ck").index["format"] == "2:4"


def test_files_labkit_did_not_write_are_never_replaced(pruned_tiny, tmp_path):
    model = pruned_tiny[0]
    user = tmp_path / "mine"
    user.mkdir()
    (user / "index.json").write_text('{"my": "own index"}')
    (user / "chunk-00001.safetensors").write_bytes(b"my data")
    with pytest.raises(ValueError, match="not a labkit sparse checkpoint"):
        ST.save_sparse(model, user)
    assert (user / "index.json").read_text() == '{"my": "own index"}'
    ST.save_sparse(model, tmp_path / "ck")
    (tmp_path / "ck" / "notes.txt").write_text("my notes")
    with pytest.raises(ValueError, match="notes.txt"):
        ST.save_sparse(model, tmp_path / "ck")
    assert (tmp_path / "ck" / "notes.txt").read_text() == "my notes"
    with pytest.raises(ValueError, match="is a file"):
        ST.save_sparse(model, tmp_path / "ck" / "notes.txt")


def test_an_edited_index_is_detected(pruned_tiny, tmp_path):
    ST.save_sparse(pruned_tiny[0], tmp_path, fmt="bitmap")
    index = json.loads((tmp_path / "index.json").read_text())
    name = next(iter(index["tensors"]))
    index["tensors"][name]["shape"] = index["tensors"][name]["shape"][::-1]
    (tmp_path / "index.json").write_text(json.dumps(index))
    with pytest.raises(ST.ChecksumError, match="edited"):
        ST.load_full(tmp_path)


def test_an_older_index_still_loads(pruned_tiny, tmp_path):
    model, ids, ref = pruned_tiny
    ST.save_sparse(model, tmp_path, fmt="bitmap")
    index = json.loads((tmp_path / "index.json").read_text())
    index["chunks"] = index.pop("files")                                # the format before lk.repro manifests
    (tmp_path / "index.json").write_text(json.dumps(index))
    with torch.no_grad():
        assert torch.equal(ST.load_full(tmp_path)(ids).logits, ref)


def test_one_tensor_is_never_split_so_a_chunk_can_exceed_chunk_bytes(pruned_tiny, tmp_path):
    model = pruned_tiny[0]
    emb = model.model.embed_tokens.weight
    index = ST.save_sparse(model, tmp_path, fmt="bitmap", chunk_bytes=emb.numel() * 4 // 2)
    chunk = index["tensors"]["model.embed_tokens.weight"]["chunk"]
    assert sum(len(n) for n in [k for k, v in index["tensors"].items() if v["chunk"] == chunk]) > 0
    assert index["files"][chunk]["bytes"] > emb.numel() * 4 // 2      # alone in its own, bigger chunk
