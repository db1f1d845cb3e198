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
    assert len(index["chunks"]) > 1                                    # really sharded
    assert index["aliases"] == {"lm_head.weight": "model.embed_tokens.weight"}
    on_disk = json.loads((tmp_path / "index.json").read_text())
    assert set(on_disk["chunks"]) == {p.name for p in tmp_path.glob("chunk-*.safetensors")}
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
        with pytest.raises(ST.ChecksumError, match=rf"checksum mismatch in .*{victim.name}.*re-save"):
            loader(tmp_path)


def test_missing_files_and_bad_folders(pruned_tiny, tmp_path):
    with pytest.raises(FileNotFoundError, match="index.json is missing"):
        ST.load_full(tmp_path)
    ST.save_sparse(pruned_tiny[0], tmp_path, fmt="bitmap", chunk_bytes=30_000)
    sorted(tmp_path.glob("chunk-*.safetensors"))[0].unlink()
    with pytest.raises(FileNotFoundError, match="is missing"):
        ST.load_full(tmp_path)
    with pytest.raises(ValueError, match="data/"):
        ST.save_sparse(pruned_tiny[0], lk.repro.REPO_ROOT / "data" / "x")
    with pytest.raises(ValueError, match="unknown format"):
        ST.save_sparse(pruned_tiny[0], tmp_path, fmt="ell")


def test_two_four_needs_a_two_four_model(tmp_path):
    model = lk.models.tiny_llama(seed=1)                                # dense: not 2:4
    with pytest.raises(ValueError, match="not 2:4 sparse"):
        ST.save_sparse(model, tmp_path, fmt="2:4")
