"""Bad inputs, as a careless learner or a hostile user would give them, to every public entry point of
labkit.sparse, compress, storage, data, models (and their experiments), the CLI, the shared helpers of other
modules (evaluate, memory, repro), and — in LESSON_CASES, one bad value per parameter — the lesson modules of
notebooks 01–07 (prune, quantize, second_order, awq, smoothquant, distill, storage, capstone, pool, kvcache,
training, sharding, footprint), each case a call that once ended in an IndexError, AttributeError, a RuntimeError
from deep inside torch, a hang, a silently wrong number, or a half-changed model (TRANSFORMS).

Each case must end in a *clear labkit error*: the expected exception type (TypeError, ValueError, ChecksumError,
FileNotFoundError), raised from labkit's own code (not from deep inside torch/numpy/transformers) with a message,
or — for degenerate but valid input — a correct result. Cases that touch files check that every file is left
exactly as it was (sha256 of the folder before and after). Random byte flips in every file format these modules
read must be detected (hypothesis).

`CASES`, `OTHER_CASES` and `LESSON_CASES` are plain tables so that the counts in the developer notes can be
recomputed:
    python -c "import tests.test_bad_inputs as t; t.summary()"
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import traceback
from pathlib import Path

import hypothesis.strategies as st
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings

import labkit as lk
from labkit import awq as A
from labkit import compress as C
from labkit import data as D
from labkit import models as Mo
from labkit import quantize as Q
from labkit import repro as R
from labkit import second_order as SO
from labkit import smoothquant as SQ
from labkit import sparse as S
from labkit import storage as ST
from labkit.experiments import compress as XC
from labkit.experiments import sparse as XS
from labkit.repro import ChecksumError

LABKIT_DIR = str(Path(lk.__file__).resolve().parent)


# ----------------------------------------------------------------------------------------------- helpers
def raised_in_labkit(exc: BaseException) -> bool:
    """True when the innermost frame of the traceback is labkit's own code (a check that names the mistake)."""
    frames = traceback.extract_tb(exc.__traceback__)
    return bool(frames) and frames[-1].filename.startswith(LABKIT_DIR)


def clear_error(fn, exc_types) -> BaseException:
    """Run fn; it must raise one of exc_types, from labkit code, with a non-trivial message."""
    with pytest.raises(exc_types) as info:
        fn()
    e = info.value
    assert raised_in_labkit(e), f"raised from outside labkit: {traceback.format_exception(e)[-3:]}"
    assert len(str(e)) >= 20, f"message too short to say how to fix it: {e!r}"
    return e


def folder_hash(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def flip(path: Path, pos: int, mask: int = 0xFF) -> bytes:
    """Flip bits of one byte of a file; return the original bytes."""
    good = path.read_bytes()
    b = bytearray(good)
    b[pos % len(b)] ^= mask
    path.write_bytes(bytes(b))
    return good


W = torch.tensor([[0.0, 1.5, 0.0, -2.0], [3.0, 0.0, 0.0, 0.0]])

# ----------------------------------------------------------------------------------------------- the table
# (id, call, expected exception types); a call that must *succeed* correctly lives in the tests further down.
TE, VE, FNF, CE = TypeError, ValueError, FileNotFoundError, ChecksumError
CASES: list[tuple[str, object, tuple]] = [
    # sparse: formats
    ("sparse.to_format None", lambda: S.to_format(None, "csr"), (TE,)),
    ("sparse.to_format list", lambda: S.to_format([[1.0, 0.0]], "csr"), (TE,)),
    ("sparse.to_format numpy", lambda: S.to_format(np.ones((2, 4)), "bitmap"), (TE,)),
    ("sparse.to_format int dtype", lambda: S.to_format(torch.ones(2, 4, dtype=torch.int64), "coo"), (TE,)),
    ("sparse.to_format bool dtype", lambda: S.to_format(torch.ones(2, 4, dtype=torch.bool), "bitmap"), (TE,)),
    ("sparse.to_format 1-D", lambda: S.to_format(torch.ones(8), "csr"), (VE,)),
    ("sparse.to_format 3-D", lambda: S.to_format(torch.ones(2, 2, 4), "2:4"), (VE,)),
    ("sparse.to_format sparse layout", lambda: S.to_format(W.to_sparse(), "csr"), (TE,)),
    ("sparse.to_format unknown fmt", lambda: S.to_format(W, "ell"), (VE,)),
    ("sparse.to_format fmt not str", lambda: S.to_format(W, 3), (VE, TE)),
    ("sparse.COO index_dtype int16", lambda: S.COO.from_dense(W, index_dtype=torch.int16), (TE,)),
    ("sparse.CSR index_dtype str", lambda: S.CSR.from_dense(W, index_dtype="int32"), (TE,)),
    ("sparse.BSR blocksize 0", lambda: S.BSR.from_dense(W, blocksize=(0, 4)), (VE,)),
    ("sparse.BSR blocksize negative", lambda: S.BSR.from_dense(W, blocksize=-2), (VE,)),
    ("sparse.BSR blocksize float", lambda: S.BSR.from_dense(W, blocksize=(2.5, 2)), (TE,)),
    ("sparse.BSR blocksize str", lambda: S.BSR.from_dense(W, blocksize="2"), (TE,)),
    ("sparse.BSR blocksize 3 values", lambda: S.BSR.from_dense(W, blocksize=(1, 2, 2)), (VE, TE)),
    ("sparse.BSR not divisible", lambda: S.BSR.from_dense(torch.zeros(10, 12), blocksize=(4, 4)), (VE,)),
    ("sparse.TwoFour cols % 4", lambda: S.TwoFour.from_dense(torch.zeros(4, 6)), (VE,)),
    ("sparse.TwoFour not 2:4", lambda: S.TwoFour.from_dense(torch.ones(4, 8)), (VE,)),
    # sparse: formulas
    ("sparse.formula_bytes unknown fmt", lambda: S.formula_bytes("ell", (4, 4), 3), (VE,)),
    ("sparse.formula_bytes negative nnz", lambda: S.formula_bytes("csr", (4, 4), -1), (VE,)),
    ("sparse.formula_bytes nnz > size", lambda: S.formula_bytes("coo", (4, 4), 17), (VE,)),
    ("sparse.formula_bytes float nnz", lambda: S.formula_bytes("csr", (4, 4), 2.5), (TE,)),
    ("sparse.formula_bytes bad shape", lambda: S.formula_bytes("csr", (4,), 2), (VE, TE)),
    ("sparse.formula_bytes negative shape", lambda: S.formula_bytes("dense", (-4, 4), 0), (VE,)),
    ("sparse.formula_bytes bsr no n_blocks", lambda: S.formula_bytes("bsr", (4, 4), 2), (VE,)),
    ("sparse.formula_bytes index dtype", lambda: S.formula_bytes("csr", (4, 4), 2, index_dtype=torch.float32), (TE,)),
    ("sparse.bytes_per_nonzero dense", lambda: S.bytes_per_nonzero("dense"), (VE,)),
    ("sparse.bytes_per_nonzero unknown", lambda: S.bytes_per_nonzero("ell"), (VE,)),
    ("sparse.storage_break_even dense", lambda: S.storage_break_even("dense"), (VE,)),
    ("sparse.storage_break_even unknown", lambda: S.storage_break_even("ell"), (VE,)),
    ("sparse.storage_break_even bad shape", lambda: S.storage_break_even("csr", shape=(0, 4)), (VE,)),
    ("sparse.random_sparse density 1.5", lambda: S.random_sparse((4, 4), 1.5), (VE,)),
    ("sparse.random_sparse density nan", lambda: S.random_sparse((4, 4), float("nan")), (VE,)),
    ("sparse.random_sparse density str", lambda: S.random_sparse((4, 4), "0.5"), (TE,)),
    ("sparse.random_sparse negative shape", lambda: S.random_sparse((-1, 4), 0.5), (VE,)),
    ("sparse.random_sparse seed str", lambda: S.random_sparse((4, 4), 0.5, seed="a"), (TE,)),
    ("sparse.nm_sparse n >= m", lambda: S.nm_sparse((4, 8), n=4, m=4), (VE,)),
    ("sparse.nm_sparse float n", lambda: S.nm_sparse((4, 8), n=1.5, m=4), (TE,)),
    ("sparse.nm_sparse cols % m", lambda: S.nm_sparse((4, 6), 2, 4), (VE,)),
    # compress
    ("compress.entropy floats", lambda: C.entropy(np.array([0.5, 1.5])), (TE,)),
    ("compress.entropy negative", lambda: C.entropy(np.array([-1, 2])), (VE,)),
    ("compress.entropy negative count", lambda: C.entropy(freqs={1: -3, 2: 5}), (VE,)),
    ("compress.entropy str", lambda: C.entropy("abc"), (TE,)),
    ("compress.frequencies None", lambda: C.frequencies(None), (TE,)),
    ("compress.huffman_lengths empty", lambda: C.huffman_lengths({}), (VE,)),
    ("compress.huffman_lengths negative", lambda: C.huffman_lengths({1: -2, 2: 3}), (VE,)),
    ("compress.huffman_lengths not dict", lambda: C.huffman_lengths([1, 2, 3]), (TE,)),
    ("compress.canonical_codes zero length", lambda: C.canonical_codes({1: 0, 2: 1}), (VE,)),
    ("compress.mean_code_length missing", lambda: C.mean_code_length({1: 3, 2: 1}, {1: 1}), (VE,)),
    ("compress.huffman_encode floats", lambda: C.huffman_encode(np.array([0.5])), (TE,)),
    ("compress.huffman_encode negative", lambda: C.huffman_encode(np.array([-1, 3])), (VE,)),
    ("compress.huffman_encode float tensor", lambda: C.huffman_encode(torch.randn(5)), (TE,)),
    ("compress.huffman_decode not encoded", lambda: C.huffman_decode(b"\x00\x01"), (TE,)),
    ("compress.huffman_decode truncated", lambda: C.huffman_decode(_truncated_huffman()), (VE, CE)),
    ("compress.huffman_decode flipped", lambda: C.huffman_decode(_flipped_huffman()), (CE,)),
    ("compress.kmeans_1d k=0", lambda: C.kmeans_1d(torch.randn(10), 0), (VE,)),
    ("compress.kmeans_1d k float", lambda: C.kmeans_1d(torch.randn(10), 2.5), (TE,)),
    ("compress.kmeans_1d empty", lambda: C.kmeans_1d(torch.zeros(0), 3), (VE,)),
    ("compress.kmeans_1d nan", lambda: C.kmeans_1d(torch.tensor([1.0, float("nan")]), 2), (VE,)),
    ("compress.kmeans_1d list", lambda: C.kmeans_1d([1.0, 2.0], 2), (TE,)),
    ("compress.kmeans_rows 1-D", lambda: C.kmeans_rows(torch.randn(5), 3), (VE,)),
    ("compress.kmeans_rows k=0", lambda: C.kmeans_rows(torch.randn(3, 5), 0), (VE,)),
    ("compress.kmeans_rows inf", lambda: C.kmeans_rows(torch.tensor([[1.0, float("inf")]]), 2), (VE,)),
    ("compress.share_weights bits 0", lambda: C.share_weights(torch.randn(8), bits=0), (VE,)),
    ("compress.share_weights bits float", lambda: C.share_weights(torch.randn(8), bits=4.0), (TE,)),
    ("compress.share_weights nan", lambda: C.share_weights(torch.tensor([1.0, float("nan")])), (VE,)),
    ("compress.share_weights numpy", lambda: C.share_weights(np.ones(4)), (TE,)),
    ("compress.pack_bits bits 9", lambda: C.pack_bits(torch.tensor([1]), 9), (VE,)),
    ("compress.pack_bits bits float", lambda: C.pack_bits(torch.tensor([1]), 4.0), (TE,)),
    ("compress.pack_bits floats", lambda: C.pack_bits(torch.tensor([1.0]), 4), (TE,)),
    ("compress.pack_bits too big", lambda: C.pack_bits(torch.tensor([16]), 4), (VE,)),
    ("compress.pack_bits negative", lambda: C.pack_bits(torch.tensor([-1]), 4), (VE,)),
    ("compress.pack_bits list", lambda: C.pack_bits([1, 2], 4), (TE,)),
    ("compress.unpack_bits too few bytes", lambda: C.unpack_bits(torch.zeros(1, dtype=torch.uint8), 4, 3), (VE,)),
    ("compress.unpack_bits int64", lambda: C.unpack_bits(torch.zeros(2, dtype=torch.int64), 4, 3), (TE,)),
    ("compress.unpack_bits negative n", lambda: C.unpack_bits(torch.zeros(2, dtype=torch.uint8), 4, -1), (VE,)),
    # experiments of notebook 04
    ("xsparse.bytes_table int", lambda: XS.bytes_table(torch.ones(4, 4, dtype=torch.int32)), (TE,)),
    ("xsparse.bytes_table unknown fmt", lambda: XS.bytes_table(W, formats=("ell",)), (VE,)),
    ("xsparse.storage_points 1-D", lambda: XS.storage_points(torch.ones(8)), (VE,)),
    ("xsparse.crossover lengths", lambda: XS.crossover([0.1, 0.2], [1.0]), (VE,)),
    ("xsparse.speed_sweep density 2", lambda: XS.speed_sweep(densities=(2.0,), n=64), (VE,)),
    ("xsparse.storage_curves density -1", lambda: XS.storage_curves([-1.0], shape=(64, 64)), (VE,)),
    ("xcompress.compare floats", lambda: XC.compare(np.array([0.5, 1.0])), (TE,)),
    ("xcompress.compare empty", lambda: XC.compare(np.zeros(0, dtype=np.int64)), (VE,)),
    ("xcompress.compare bits too small", lambda: XC.compare(np.array([0, 200]), bits=4), (VE,)),
    ("xcompress.compressed_sizes str", lambda: XC.compressed_sizes("abc"), (TE,)),
    # storage (no files needed)
    ("storage.save_sparse model str", lambda: ST.save_sparse("model", "/tmp/x-never-written"), (TE,)),
    ("storage.load_full missing", lambda: ST.load_full("/nonexistent/labkit-checkpoint"), (FNF,)),
    ("storage.load_full folder int", lambda: ST.load_full(42), (TE,)),
    ("storage.load_lazy missing", lambda: ST.load_lazy("/nonexistent/labkit-checkpoint"), (FNF,)),
    ("storage.checkpoint_bytes missing", lambda: ST.checkpoint_bytes("/nonexistent/labkit-checkpoint"), (FNF,)),
    # data
    ("data.books bad split", lambda: D.books("dev"), (VE,)),
    ("data.texts split int", lambda: D.texts(3), (VE, TE)),
    ("data.tokens bad split", lambda: D.tokens("training", None), (VE,)),
    ("data.tokens tokenizer str", lambda: D.tokens("validation", "gpt2"), (TE,)),
    ("data.text_tokens int", lambda: D.text_tokens(123, _tok()), (TE,)),
    ("data.text_tokens empty", lambda: D.text_tokens("   ", _tok()), (VE,)),
    ("data.text_tokens too short", lambda: D.text_tokens("Too short.", _tok()), (VE,)),
    ("data.text_tokens missing file", lambda: D.text_tokens(Path("/nonexistent/a.txt"), _tok()), (FNF,)),
    ("data.text_tokens min_tokens 0", lambda: D.text_tokens("a b c " * 200, _tok(), min_tokens=0), (VE,)),
    ("data.text_tokens list of int", lambda: D.text_tokens([1, 2], _tok()), (TE,)),
    # models
    ("models.load_model int", lambda: Mo.load_model(123), (TE,)),
    ("models.load_model dtype str", lambda: Mo.load_model("smollm2-135m", dtype="float16"), (TE,)),
    ("models.load_model dtype int", lambda: Mo.load_model("smollm2-135m", dtype=torch.int8), (VE,)),
    ("models.load_model bad kind", lambda: Mo.load_model("smollm2-135m", kind="decoder"), (VE,)),
    ("models.load_model folder without config", lambda: Mo.load_model(str(Path(lk.__file__).parent)), (FNF,)),
    ("models.prepare unknown", lambda: Mo.prepare("llama-70b"), (VE,)),
    ("models.prepare int", lambda: Mo.prepare(7), (VE, TE)),
    ("models.source_file unknown", lambda: Mo.source_file("llama-70b"), (VE,)),
    ("models.tiny_llama heads", lambda: Mo.tiny_llama(hidden_size=30, num_attention_heads=4), (VE,)),
    ("models.tiny_llama kv_heads", lambda: Mo.tiny_llama(num_attention_heads=4, num_key_value_heads=3), (VE,)),
    ("models.tiny_llama num_hidden_layers 0", lambda: Mo.tiny_llama(num_hidden_layers=0), (VE,)),
    ("models.tiny_llama float", lambda: Mo.tiny_llama(hidden_size=64.5), (TE,)),
    ("models.generate prompt int", lambda: Mo.generate(Mo.tiny_llama(vocab_size=49152), _tok(), 123), (TE,)),
    ("models.generate max_new_tokens -1", lambda: Mo.generate(Mo.tiny_llama(vocab_size=49152), _tok(), "Hi",
                                                              max_new_tokens=-1), (VE,)),
    ("models.sentence_embeddings empty", lambda: Mo.sentence_embeddings(None, _tok(), []), (VE,)),
    ("models.tiny_llama old name", lambda: Mo.tiny_llama(layers=2), (TE,)),
    ("models.LlamaSpec eps 0", lambda: Mo.LlamaSpec(rms_norm_eps=0), (VE,)),
    ("models.LlamaSpec tie str", lambda: Mo.LlamaSpec(tie_word_embeddings="yes"), (TE,)),
    ("models.build_llama dict", lambda: Mo.build_llama({"hidden_size": 64}), (TE,)),
    ("distill.make_student vocab_size", lambda: lk.distill.make_student(_tiny().config, vocab_size=10), (VE,)),
    ("models.sentence_embeddings not str", lambda: Mo.sentence_embeddings(None, _tok(), [1, 2]), (TE,)),
]

# The shared helpers of the lower floors (evaluate, memory, repro) and plots.
OTHER_CASES: list[tuple[str, object, tuple]] = [
    ("evaluate.perplexity max_tokens 0", lambda: lk.perplexity(_tiny(), torch.arange(600), max_tokens=0), (VE,)),
    ("evaluate.perplexity max_tokens -1000", lambda: lk.perplexity(_tiny(), torch.arange(600), max_tokens=-1000), (VE,)),
    ("evaluate.perplexity max_tokens float", lambda: lk.perplexity(_tiny(), torch.arange(600), max_tokens=300.5), (TE, VE)),
    ("evaluate.perplexity max_tokens str", lambda: lk.perplexity(_tiny(), torch.arange(600), max_tokens="512"), (TE,)),
    ("evaluate.perplexity tokens list", lambda: lk.perplexity(_tiny(), list(range(600)), max_tokens=256), (TE,)),
    ("evaluate.perplexity tokens float", lambda: lk.perplexity(_tiny(), torch.rand(600), max_tokens=256), (TE,)),
    ("evaluate.perplexity tokens 2-D", lambda: lk.perplexity(_tiny(), torch.zeros(2, 600, dtype=torch.long),
                                                              max_tokens=256), (VE,)),
    ("evaluate.perplexity too few tokens", lambda: lk.perplexity(_tiny(), torch.arange(100), max_tokens=256), (VE,)),
    ("evaluate.perplexity id >= vocab", lambda: lk.perplexity(_tiny(), torch.full((600,), 10_000),
                                                              max_tokens=256), (VE,)),
    ("evaluate.perplexity model str", lambda: lk.perplexity("smollm2", torch.arange(600), max_tokens=256), (TE,)),
    ("evaluate.gap_closed str", lambda: lk.evaluate.gap_closed("30", 40.0, 35.0), (TE,)),
    ("evaluate.gap_closed no gap", lambda: lk.evaluate.gap_closed(30.0, 30.0, 35.0), (VE,)),
    ("evaluate.gap_closed below 1", lambda: lk.evaluate.gap_closed(0.5, 40.0, 35.0), (VE,)),
    ("evaluate.gap_closed nan", lambda: lk.evaluate.gap_closed(30.0, 40.0, float("nan")), (VE,)),
    ("memory.fmt_bytes str", lambda: lk.fmt_bytes("12"), (TE,)),
    ("memory.fmt_bytes negative", lambda: lk.fmt_bytes(-5), (VE,)),
    ("memory.tensor_bytes str", lambda: lk.tensor_bytes("weights"), (TE,)),
    ("memory.count_params None", lambda: lk.count_params(None), (TE,)),
    ("memory.model_bytes tensor", lambda: lk.model_bytes(torch.ones(3)), (TE,)),
    ("memory.estimate_kv_cache_bytes negative", lambda: lk.estimate_kv_cache_bytes(_tiny().config, -1, 10), (VE,)),
    ("memory.estimate_kv_cache_bytes float", lambda: lk.estimate_kv_cache_bytes(_tiny().config, 1.5, 10), (TE,)),
    ("memory.estimate_kv_cache_bytes config dict", lambda: lk.estimate_kv_cache_bytes({}, 1, 10), (TE, VE)),
    ("repro.threads 0", lambda: R.threads(0).__enter__(), (VE,)),
    ("repro.threads float", lambda: R.threads(1.5).__enter__(), (VE, TE)),
    ("repro.time_call not callable", lambda: R.time_call(3), (TE,)),
    ("repro.time_call min_run_time -1", lambda: R.time_call(lambda: None, min_run_time=-1), (VE,)),
    ("repro.load_results unknown", lambda: R.load_results("no-such-results"), (FNF,)),
    ("repro.load_results path traversal", lambda: R.load_results("../../etc/passwd"), (VE, FNF)),
    ("repro.atomic_write_json not serialisable", lambda: R.atomic_write_json("/tmp/lk-never.json", {"a": object()}), (TE,)),
    ("repro.read_verified missing", lambda: R.read_verified("/nonexistent/x.bin", "k", "fix it"), (CE, FNF)),
    ("repro.read_manifest missing", lambda: R.read_manifest("/nonexistent/folder", "k", "fix it"), (CE, FNF)),
    ("repro.write_verified str data", lambda: R.write_verified("/tmp/lk-never.bin", "text", "k"), (TE,)),
    ("repro.seed_everything str", lambda: R.seed_everything("zero"), (TE,)),
    ("plots.memory_quality no bytes", lambda: lk.plots.memory_quality([{"quality": 1.0}]), (VE,)),
    ("evaluate.perplexity negative id", lambda: lk.perplexity(_tiny(), torch.arange(600) % 256 - 1, max_tokens=256), (VE,)),
    ("evaluate.perplexity numpy tokens", lambda: lk.perplexity(_tiny(), np.arange(600) % 256, max_tokens=256), (TE,)),
    ("evaluate.perplexity batch_size 0", lambda: lk.perplexity(_tiny(), torch.arange(600) % 256, max_tokens=256,
                                                               batch_size=0), (VE,)),
    ("evaluate.perplexity batch_size float", lambda: lk.perplexity(_tiny(), torch.arange(600) % 256, max_tokens=256,
                                                                   batch_size=1.5), (TE,)),
    ("memory.fmt_bytes nan", lambda: lk.fmt_bytes(float("nan")), (VE,)),
    ("memory.bytes_by_module tensor", lambda: lk.memory.bytes_by_module(torch.ones(3)), (TE,)),
    ("memory.bytes_by_dtype None", lambda: lk.memory.bytes_by_dtype(None), (TE,)),
    ("memory.param_kind int", lambda: lk.memory.param_kind(3), (TE,)),
    ("memory.estimate_param_bytes negative", lambda: lk.memory.estimate_param_bytes(-5), (VE,)),
    ("memory.estimate_param_bytes str", lambda: lk.memory.estimate_param_bytes("100"), (TE,)),
    ("memory.estimate_training_bytes str", lambda: lk.memory.estimate_training_bytes("100"), (TE,)),
    ("memory.estimate_params None", lambda: lk.memory.estimate_params(None), (TE,)),
    ("memory.estimate_activation_bytes batch -1", lambda: lk.memory.estimate_activation_bytes(_tiny().config, -1, 10),
     (VE,)),
    ("memory.layer_activation_bytes seq_len str", lambda: lk.memory.layer_activation_bytes(_tiny().config, 1, "10"),
     (TE,)),
    ("memory.measure_memory interval 0", lambda: lk.memory.measure_memory(0).__enter__(), (VE,)),
    ("memory.run_in_subprocess not callable", lambda: lk.memory.run_in_subprocess(3), (TE,)),
    ("memory.run_in_subprocess env int", lambda: lk.memory.run_in_subprocess(lk.memory.current_rss, env={"A": 1}),
     (TE,)),
    ("repro.threads str", lambda: R.threads("2").__enter__(), (TE,)),
    ("repro.time_call min_run_time str", lambda: R.time_call(lambda: None, min_run_time="0.1"), (TE,)),
    ("repro.time_call n_threads 0", lambda: R.time_call(lambda: None, n_threads=0), (VE,)),
    ("repro.seed_everything negative", lambda: R.seed_everything(-1), (VE,)),
    ("repro.seed_everything float", lambda: R.seed_everything(1.5), (TE,)),
    ("repro.atomic_write_bytes str", lambda: R.atomic_write_bytes("/tmp/lk-never.bin", "text"), (TE,)),
    ("repro.atomic_write_bytes onto a folder", lambda: R.atomic_write_bytes(R.REPO_ROOT / "data", b"x"), (OSError,)),
    ("repro.load_results int", lambda: R.load_results(3), (TE,)),
    ("repro.results_path traversal", lambda: R.results_path("../x"), (VE,)),
    ("repro.write_verified kind int", lambda: R.write_verified("/tmp/lk-never.bin", b"x", 3), (TE,)),
    ("repro.write_manifest no folder", lambda: R.write_manifest("/nonexistent/folder", "k"), (FNF,)),
    ("prune.check_sparsity str", lambda: lk.prune.check_sparsity("0.5"), (TE,)),
    ("prune.PruneConfig sparsity str", lambda: lk.prune.PruneConfig(method="magnitude", sparsity="0.5"), (TE,)),
    ("distill.make_sequences seq_len 0", lambda: lk.distill.make_sequences(torch.arange(100), 0, 4), (VE,)),
    ("distill.make_sequences n_seqs float", lambda: lk.distill.make_sequences(torch.arange(100), 8, 2.5), (TE,)),
    ("distill.make_sequences 2-D", lambda: lk.distill.make_sequences(torch.zeros(2, 50, dtype=torch.long), 8, 2), (TE,)),
    ("distill.logit_cache_bytes k float", lambda: lk.distill.logit_cache_bytes(100, 256, k=2.5), (TE,)),
    ("distill.logit_cache_bytes negative", lambda: lk.distill.logit_cache_bytes(-100, 256), (VE,)),
]

# The lesson modules (notebooks 01–07), case by case as a fuzzer found them: each call once raised an IndexError,
# AttributeError, RuntimeError from deep inside torch, returned a silently wrong number, hung, or changed the model.
LESSON_CASES: list[tuple[str, object, tuple]] = [
    # calibration / prune (notebook 01)
    ("calibration.default_filter fqn None", lambda: lk.calibration.default_filter(torch.nn.Linear(2, 2), None), (TE,)),
    ("calibration.select_linears model str", lambda: lk.prune.select_linears("model"), (TE,)),
    ("calibration.select_linears filter_fn int", lambda: lk.prune.select_linears(_tiny(), 3), (TE,)),
    ("calibration.calibration_batches tokens None", lambda: lk.prune.calibration_batches(None), (TE,)),
    ("calibration.calibration_batches n_samples 0", lambda: lk.prune.calibration_batches(_ids(4096), 0, 32), (VE,)),
    ("calibration.calibration_batches n_samples 10**12", lambda: lk.prune.calibration_batches(_ids(4096), 10**12, 32),
     (VE,)),
    ("calibration.calibration_batches seq_len -1", lambda: lk.prune.calibration_batches(_ids(4096), 4, -1), (VE,)),
    ("calibration.collect_input_norms Sequential", lambda: lk.prune.collect_input_norms(_seq(), _ids(4096)), (TE,)),
    ("calibration.collect_input_norms ids >= vocab", lambda: lk.prune.collect_input_norms(_tiny(), _ids(4096) + 10**6),
     (VE,)),
    ("calibration.collect_input_norms float tokens", lambda: lk.prune.collect_input_norms(_tiny(), torch.rand(4096)),
     (TE,)),
    ("calibration.collect_input_norms batch_size 0", lambda: lk.prune.collect_input_norms(_tiny(), _ids(4096),
                                                                                           batch_size=0), (VE,)),
    ("prune.mask_from_scores complex", lambda: lk.prune.mask_from_scores(_w().to(torch.complex64), 0.5), (TE,)),
    ("prune.mask_from_scores list", lambda: lk.prune.mask_from_scores([[0.1, 0.2]], 0.5), (TE,)),
    ("prune.magnitude_mask weight None", lambda: lk.prune.magnitude_mask(None, 0.5), (TE,)),
    ("prune.magnitude_mask NaN weight", lambda: lk.prune.magnitude_mask(_w(nan=True), 0.5), (VE,)),
    ("prune.row_mask_from_scores numpy", lambda: lk.prune.row_mask_from_scores(_w().numpy(), 0.5), (TE,)),
    ("prune.nm_mask str", lambda: lk.prune.nm_mask("w"), (TE,)),
    ("prune.nm_mask_from_scores complex", lambda: lk.prune.nm_mask_from_scores(_w().to(torch.complex64)), (TE,)),
    ("prune.wanda_scores input_norm None", lambda: lk.prune.wanda_scores(_w(), None), (TE,)),
    ("prune.wanda_scores NaN weight", lambda: lk.prune.wanda_scores(_w(nan=True), torch.ones(16)), (VE,)),
    ("prune.global_magnitude_masks list", lambda: lk.prune.global_magnitude_masks([_w()], 0.5), (TE,)),
    ("prune.global_masks_from_scores None values", lambda: lk.prune.global_masks_from_scores({"a": None}, 0.5), (TE,)),
    ("prune.sparsity_of list of floats", lambda: lk.prune.sparsity_of([0.0, 1.0]), (TE,)),
    ("prune.sparsity_of str", lambda: lk.prune.sparsity_of("w"), (TE,)),
    ("prune.compute_masks config dict", lambda: lk.prune.compute_masks(_tiny(), {"sparsity": 0.5}), (TE,)),
    ("prune.compute_masks model str", lambda: lk.prune.compute_masks("m", lk.prune.PruneConfig()), (TE,)),
    ("prune.apply_masks_ masks list", lambda: lk.prune.apply_masks_(_tiny(), []), (TE,)),
    ("prune.prune_ model None", lambda: lk.prune.prune_(None, lk.prune.PruneConfig()), (TE,)),
    ("prune.prune_ wanda float calib_tokens", lambda: lk.prune.prune_(Mo.tiny_llama(), lk.prune.PruneConfig(
        method="wanda"), calib_tokens=torch.rand(4096)), (TE,)),
    ("prune.prune_ wanda ids >= vocab", lambda: lk.prune.prune_(Mo.tiny_llama(), lk.prune.PruneConfig(
        method="wanda"), calib_tokens=_ids(4096) + 300), (VE,)),
    ("prune.prune_ wanda windows longer than the model reads", lambda: lk.prune.prune_(
        Mo.tiny_llama(max_position_embeddings=64), lk.prune.PruneConfig(method="wanda"), calib_tokens=_ids(4096)),
     (VE,)),
    ("prune.prune_ sparsegpt Sequential", lambda: lk.prune.prune_(_seq(), lk.prune.PruneConfig(method="sparsegpt"),
                                                                  calib_tokens=_ids(4096)), (TE,)),
    ("prune.neuron_scores not an MLP", lambda: lk.prune.neuron_scores(torch.nn.Linear(4, 4)), (TE,)),
    ("prune.neuron_scores norm of the wrong size", lambda: lk.prune.neuron_scores(
        _tiny().model.layers[0].mlp, torch.ones(5)), (VE,)),
    ("prune.prune_mlp_neurons_ input_norms str", lambda: lk.prune.prune_mlp_neurons_(Mo.tiny_llama(), 0.5, "n"), (TE,)),
    ("prune.recovery_finetune_ Sequential", lambda: lk.prune.recovery_finetune_(_seq(), _ids(4096)), (TE,)),
    ("prune.recovery_finetune_ steps 10**12", lambda: lk.prune.recovery_finetune_(Mo.tiny_llama(), _ids(4096),
                                                                                  steps=10**12), (VE,)),
    ("prune.recovery_finetune_ lr inf", lambda: lk.prune.recovery_finetune_(Mo.tiny_llama(), _ids(4096),
                                                                            lr=float("inf")), (VE,)),
    ("prune.recovery_finetune_ lr 1e12", lambda: lk.prune.recovery_finetune_(Mo.tiny_llama(), _ids(4096), lr=1e12),
     (VE,)),
    ("prune.recovery_finetune_ seq_len 0", lambda: lk.prune.recovery_finetune_(Mo.tiny_llama(), _ids(4096),
                                                                               seq_len=0), (VE,)),
    ("prune.recovery_finetune_ batch_size 10**12", lambda: lk.prune.recovery_finetune_(
        Mo.tiny_llama(), _ids(4096), batch_size=10**12), (VE,)),
    ("prune.recovery_finetune_ seed str", lambda: lk.prune.recovery_finetune_(Mo.tiny_llama(), _ids(4096),
                                                                              seed="0"), (TE,)),
    ("prune.recovery_finetune_ float tokens", lambda: lk.prune.recovery_finetune_(Mo.tiny_llama(), torch.rand(4096)),
     (TE,)),
    ("prune.state_dict_bytes None", lambda: lk.prune.state_dict_bytes(None), (TE,)),
    # second_order (notebooks 01 and 02)
    ("second_order.hessian None", lambda: SO.hessian(None), (TE,)),
    ("second_order.hessian 0-d", lambda: SO.hessian(torch.tensor(1.0)), (VE,)),
    ("second_order.HessianAccumulator in_features 10**12", lambda: SO.HessianAccumulator(10**12), (VE,)),
    ("second_order.HessianAccumulator.add list", lambda: SO.HessianAccumulator(4).add([[1.0] * 4]), (TE,)),
    ("second_order.inverse_cholesky not positive definite", lambda: SO.inverse_cholesky(-torch.eye(4)), (VE,)),
    ("second_order.prepare_hessian NaN", lambda: SO.prepare_hessian(_hess(nan=True), _w()), (VE,)),
    ("second_order.layer_error shapes differ", lambda: SO.layer_error(_w(), _w()[:1], torch.randn(32, 16)), (VE,)),
    ("second_order.layer_error NaN inputs", lambda: SO.layer_error(_w(), _w(), _w(nan=True)), (VE,)),
    ("second_order.obs_solve grid str", lambda: SO.obs_solve(_w(), _hess(), grid="int4"), (TE,)),
    ("second_order.obs_solve blocksize 0", lambda: SO.obs_solve(_w(), _hess(), sparsity=0.5, blocksize=0), (VE,)),
    ("second_order.gptq act_order str", lambda: SO.gptq(_w(), _hess(), SO.Grid(4), act_order="yes"), (TE,)),
    ("second_order.sparsegpt nm ()", lambda: SO.sparsegpt(_w(), _hess(), nm=()), (TE,)),
    ("second_order.collect_stats float batches", lambda: SO.collect_stats(_tiny(), torch.rand(2, 16)), (TE,)),
    ("second_order.collect_stats 1-D batches", lambda: SO.collect_stats(_tiny(), _ids(16)), (VE,)),
    ("second_order.collect_stats Sequential", lambda: SO.collect_stats(_seq(), _ids(32).reshape(2, 16)), (TE,)),
    ("second_order.sequential_ solve None", lambda: SO.sequential_(_tiny(), _ids(32).reshape(2, 16), None), (TE,)),
    ("second_order.calibrate_layers BertModel", lambda: SO.calibrate_layers(_bert(), _ids(32).reshape(2, 16),
                                                                           lambda *a: None), (TE,)),
    ("second_order.gptq_ ids >= vocab", lambda: SO.gptq_(Mo.tiny_llama(), _ids(32).reshape(2, 16) + 300,
                                                         lk.quantize.QuantConfig(4)), (VE,)),
    ("second_order.gptq_ blocksize 1.5", lambda: SO.gptq_(Mo.tiny_llama(), _ids(32).reshape(2, 16),
                                                          lk.quantize.QuantConfig(4), blocksize=1.5), (TE,)),
    # qtensor / quantize (notebook 02)
    ("qtensor.quantize unknown granularity with a group_size", lambda: Q.quantize(_w(), 4, "rows", 8), (VE,)),
    ("qtensor.quantize group_size 1.5", lambda: Q.quantize(_w(), 4, "group", 1.5), (TE,)),
    ("qtensor.quantize symmetric str", lambda: Q.quantize(_w(), 4, symmetric="no"), (TE,)),
    ("qtensor.quant_error x of another shape", lambda: Q.quant_error(_w()[:1], Q.quantize(_w(), 4)), (VE,)),
    ("qtensor.quant_error NaN x", lambda: Q.quant_error(_w(nan=True), Q.quantize(_w(), 4)), (VE,)),
    ("qtensor.dequantize dict", lambda: Q.dequantize({"packed": None}), (TE,)),
    ("qtensor.save_qtensor None", lambda: Q.save_qtensor(None, "/tmp/lk-never.st"), (TE,)),
    ("qtensor.QTensor packed too short", lambda: Q.QTensor(torch.zeros(3, dtype=torch.uint8), torch.ones(8, 1), None, 4,
                                                           16, (8, 16), True, "channel"), (VE,)),
    ("qtensor.QTensor bits 5", lambda: Q.QTensor(torch.zeros(64, dtype=torch.uint8), torch.ones(8, 1), None, 5, 16,
                                                 (8, 16), True, "channel"), (VE,)),
    ("quantize.cast_error dtype None", lambda: Q.cast_error(_w(), None), (TE,)),
    ("quantize.cast_error dtype int8", lambda: Q.cast_error(_w(), torch.int8), (TE,)),
    ("quantize.distinct_per_block block 0", lambda: Q.distinct_per_block(_w(), 0), (VE,)),
    ("quantize.distinct_per_block block that does not divide", lambda: Q.distinct_per_block(_w(), 5), (VE,)),
    ("quantize.mixed_int8_matmul inf x", lambda: Q.mixed_int8_matmul(_w(inf=True), _w()), (VE,)),
    ("quantize.mixed_int8_matmul threshold nan", lambda: Q.mixed_int8_matmul(_w(), _w(), float("nan")), (VE,)),
    ("quantize.int8_matmul_errors 1-D w", lambda: Q.int8_matmul_errors(_w(), torch.ones(16)), (VE,)),
    ("quantize.int8_matmul_errors x None", lambda: Q.int8_matmul_errors(None, _w()), (TE,)),
    ("quantize.linear_input_stats names str", lambda: Q.linear_input_stats(_tiny(), _ids(16), names="q_proj"), (TE,)),
    ("quantize.linear_input_stats unknown name", lambda: Q.linear_input_stats(_tiny(), _ids(16), names=["nope"]),
     (VE,)),
    ("quantize.linear_input_stats float tokens", lambda: Q.linear_input_stats(_tiny(), torch.rand(16)), (TE,)),
    ("quantize.QuantLinear q None", lambda: Q.QuantLinear(None), (TE,)),
    ("quantize.QuantLinear bias of the wrong size", lambda: Q.QuantLinear(Q.quantize(_w(), 4), torch.zeros(3)), (VE,)),
    ("quantize.torchao_int8_weight Sequential", lambda: Q.torchao_int8_weight(_seq()), (TE,)),
    ("quantize.torchao_config group_size 0", lambda: Q.torchao_config("int4 weight-only", 0), (VE,)),
    ("quantize.skip_tied None", lambda: Q.skip_tied(None), (TE,)),
    ("quantize.quantized_linear_bytes str", lambda: Q.quantized_linear_bytes("m"), (TE,)),
    # awq (notebook 02)
    ("awq.fake_quantize w None", lambda: A.fake_quantize(None, lk.quantize.QuantConfig(4)), (TE,)),
    ("awq.output_error shapes differ", lambda: A.output_error(_w(), _w()[:1], _hess()), (VE,)),
    ("awq.output_error H NaN", lambda: A.output_error(_w(), _w(), _hess(nan=True)), (VE,)),
    ("awq.output_error dtype int8", lambda: A.output_error(_w(), _w(), _hess(), torch.int8), (TE,)),
    ("awq.relative_error new_weight None", lambda: A.relative_error(_w(), None, _hess()), (TE,)),
    ("awq.channel_scales NaN", lambda: A.channel_scales(torch.tensor([1.0, float("nan")]), 0.5), (VE,)),
    ("awq.scaled_rtn s int", lambda: A.scaled_rtn(_w(), torch.ones(16, dtype=torch.long),
                                                  lk.quantize.QuantConfig(4)), (TE,)),
    ("awq.search_scale weights tensor", lambda: A.search_scale(_w(), torch.ones(16), _hess(),
                                                               lk.quantize.QuantConfig(4)), (TE,)),
    ("awq.search_scale H None", lambda: A.search_scale([_w()], torch.ones(16), None, lk.quantize.QuantConfig(4)), (TE,)),
    ("awq.clip_search ratios empty", lambda: A.clip_search(_w(), _hess(), lk.quantize.QuantConfig(4), ()), (VE,)),
    ("awq.salient_channels frac 1.5", lambda: A.salient_channels(torch.rand(16), 1.5), (VE,)),
    ("awq.keep_in_fp16 channel out of range", lambda: A.keep_in_fp16(_w(), torch.tensor([99]),
                                                                     lk.quantize.QuantConfig(4)), (VE,)),
    ("awq.gqa_expand not attention", lambda: A.gqa_expand(_seq()), (TE,)),
    ("awq.llama_groups Sequential", lambda: A.llama_groups(_seq()), (TE,)),
    ("awq.scale_input_ unknown fqn", lambda: A.scale_input_(_tiny(), "model.nope", torch.ones(64)), (VE,)),
    ("awq.InputScaled negative scales", lambda: A.InputScaled(torch.nn.Linear(4, 4), -torch.ones(4)), (VE,)),
    ("awq.awq_ clip str", lambda: A.awq_(Mo.tiny_llama(), _ids(32).reshape(2, 16), lk.quantize.QuantConfig(4),
                                         clip="yes"), (TE,)),
    ("awq.awq_ float calibration", lambda: A.awq_(Mo.tiny_llama(), torch.rand(2, 16), lk.quantize.QuantConfig(4)),
     (TE,)),
    ("awq.awq_explicit_ stats list", lambda: A.awq_explicit_(Mo.tiny_llama(), [], lk.quantize.QuantConfig(4)), (TE,)),
    # smoothquant (notebook 02)
    ("smoothquant.relative_error shapes differ", lambda: SQ.relative_error(_w()[:1], _w()), (VE,)),
    ("smoothquant.relative_error NaN", lambda: SQ.relative_error(_w(nan=True), _w()), (VE,)),
    ("smoothquant.w8a8_matmul x None", lambda: SQ.w8a8_matmul(None, _w()), (TE,)),
    ("smoothquant.fake_quant_weight 1-D", lambda: SQ.fake_quant_weight(torch.ones(4)), (VE,)),
    ("smoothquant.fake_quant_activations 0-d", lambda: SQ.fake_quant_activations(torch.tensor(1.0)), (VE,)),
    ("smoothquant.search_alpha x 0-d", lambda: SQ.search_alpha(torch.tensor(1.0), [_w()]), (VE,)),
    ("smoothquant.W8A8Linear input_scale of the wrong size", lambda: SQ.W8A8Linear(torch.nn.Linear(4, 4),
                                                                                   input_scale=torch.ones(3)), (VE,)),
    ("smoothquant.W8A8Linear Sequential", lambda: SQ.W8A8Linear(_seq()), (TE,)),
    ("smoothquant.llama_groups Sequential", lambda: SQ.llama_groups(_seq()), (TE,)),
    ("smoothquant.smooth_ stats list", lambda: SQ.smooth_(Mo.tiny_llama(), []), (TE,)),
    ("smoothquant.w8a8_ model str", lambda: SQ.w8a8_("m"), (TE,)),    # distill / teacher_targets (notebook 03)
    ("distill.check_vocab teacher None", lambda: lk.distill.check_vocab(None, _tiny()), (TE,)),
    ("distill.check_vocab tokenizer str", lambda: lk.distill.check_vocab(_tiny(), _tiny(), "gpt2"), (TE,)),
    ("distill.make_depth_student BertModel", lambda: lk.distill.make_depth_student(_bert(), [0]), (TE,)),
    ("distill.make_student config dict", lambda: lk.distill.make_student({"vocab_size": 256}), (TE,)),
    ("distill.embedding_share Sequential", lambda: lk.distill.embedding_share(_seq()), (TE,)),
    ("distill.kd_loss NaN student logits", lambda: lk.distill.kd_loss(_logits(nan=True), _logits(), _labels()), (VE,)),
    ("distill.kd_loss NaN teacher logits", lambda: lk.distill.kd_loss(_logits(), _logits(nan=True), _labels()), (VE,)),
    ("distill.kd_loss teacher_logits list", lambda: lk.distill.kd_loss(_logits(), [[0.0]], _labels()), (TE,)),
    ("distill.kd_loss 0-d logits", lambda: lk.distill.kd_loss(torch.tensor(1.0), torch.tensor(1.0)), (VE,)),
    ("distill.kd_loss label >= vocab", lambda: lk.distill.kd_loss(_logits(), _logits(), _labels() + 300), (VE,)),
    ("distill.kd_loss labels numpy", lambda: lk.distill.kd_loss(_logits(), _logits(), _labels().numpy()), (TE,)),
    ("distill.kd_loss ignore_index 1.5", lambda: lk.distill.kd_loss(_logits(), _logits(), _labels(), ignore_index=1.5),
     (TE,)),
    ("distill.TrainConfig steps 10**12", lambda: lk.distill.TrainConfig(steps=10**12), (VE,)),
    ("distill.TrainConfig lr 1e12", lambda: lk.distill.TrainConfig(lr=1e12), (VE,)),
    ("distill.batch_order batch_size 0", lambda: lk.distill.batch_order(8, 5, 0, 0), (VE,)),
    ("distill.batch_order n_seqs 10**12", lambda: lk.distill.batch_order(10**12, 5, 2, 0), (VE,)),
    ("distill.batch_order seed 1.5", lambda: lk.distill.batch_order(8, 5, 2, 1.5), (TE,)),
    ("distill.lr_at step nan", lambda: lk.distill.lr_at(float("nan"), lk.distill.TrainConfig()), (TE,)),
    ("distill.lr_at cfg dict", lambda: lk.distill.lr_at(3, {"lr": 1e-3}), (TE,)),
    ("distill.save_checkpoint state list", lambda: lk.distill.save_checkpoint("/tmp/lk-never.pt", []), (TE,)),
    ("distill.train_student Sequential", lambda: lk.distill.train_student(_seq(), _seqs(), lk.distill.TrainConfig(
        steps=2)), (TE,)),
    ("distill.train_student float seqs", lambda: lk.distill.train_student(Mo.tiny_llama(), _seqs().float(),
                                                                          lk.distill.TrainConfig(steps=2)), (TE,)),
    ("distill.train_student checkpoint int", lambda: lk.distill.train_student(Mo.tiny_llama(), _seqs(),
                                                                              lk.distill.TrainConfig(steps=2),
                                                                              checkpoint=3), (TE,)),
    ("distill.train_student teacher_logits str", lambda: lk.distill.train_student(
        Mo.tiny_llama(), _seqs(), lk.distill.TrainConfig(steps=2, alpha=0.5), teacher_logits="t"), (TE,)),
    ("distill.weights_sha256 None", lambda: lk.distill.weights_sha256(None), (TE,)),
    ("teacher_targets.vocab_size_of Sequential", lambda: lk.distill.vocab_size_of(_seq()), (TE,)),
    ("teacher_targets.TopKLogits values list", lambda: lk.distill.TopKLogits([0.0], torch.zeros(1, dtype=torch.long),
                                                                             256), (TE,)),
    ("teacher_targets.TopKLogits index >= vocab", lambda: lk.distill.TopKLogits(torch.zeros(2, 4), torch.full(
        (2, 4), 300), 256), (VE,)),
    ("teacher_targets.TopKLogits vocab_size 1.5", lambda: lk.distill.TopKLogits(torch.zeros(2, 4), torch.zeros(
        2, 4, dtype=torch.long), 1.5), (TE,)),
    ("teacher_targets.tail_logmass index >= vocab", lambda: lk.distill.tail_logmass(_logits(), torch.full(
        (2, 8, 4), 999)), (VE,)),
    ("teacher_targets.tail_logmass temps ()", lambda: lk.distill.tail_logmass(_logits(), torch.zeros(
        2, 8, 4, dtype=torch.long), ()), (VE,)),
    ("teacher_targets.teacher_topk BertModel", lambda: lk.distill.teacher_topk(_bert(), _seqs()), (TE,)),
    ("teacher_targets.teacher_topk float seqs", lambda: lk.distill.teacher_topk(_tiny(), _seqs().float()), (TE,)),
    ("teacher_targets.topk_mass dict", lambda: lk.distill.topk_mass({"values": 1}), (TE,)),
    ("data.token_cache_path tokenizer None", lambda: D.token_cache_path("validation", None), (TE,)),    # sparse / compress / storage (notebook 04)
    ("sparse.CSR @ x of the wrong shape", lambda: S.CSR.from_dense(W) @ torch.ones(3, 2), (VE,)),
    ("sparse.CSR @ x list", lambda: S.CSR.from_dense(W) @ [[1.0]], (TE,)),
    ("sparse.parts_bytes list", lambda: S.parts_bytes([1, 2]), (TE,)),
    ("sparse.formula_bytes bsr n_blocks -1", lambda: S.formula_bytes("bsr", (8, 16), 10, n_blocks=-1), (VE,)),
    ("sparse.formula_bytes bsr n_blocks 1.5", lambda: S.formula_bytes("bsr", (8, 16), 10, n_blocks=1.5), (TE,)),
    ("sparse.formula_bytes bsr more blocks than fit", lambda: S.formula_bytes("bsr", (8, 16), 10, n_blocks=99), (VE,)),
    ("sparse.bytes_per_nonzero index int8", lambda: S.bytes_per_nonzero("csr", index_dtype=torch.int8), (TE,)),
    ("sparse.storage_break_even value complex", lambda: S.storage_break_even("csr", value_dtype=torch.complex64),
     (TE,)),
    ("sparse_matrices.random_sparse dtype int8", lambda: S.random_sparse((4, 4), 0.5, dtype=torch.int8), (TE,)),
    ("sparse_matrices.check_matrix what int", lambda: lk.sparse_matrices.check_matrix(W, 3), (TE,)),
    ("compress.kmeans_1d iters 10**12", lambda: C.kmeans_1d(torch.randn(10), 2, iters=10**12), (VE,)),
    ("compress.kmeans_1d k 10**12", lambda: C.kmeans_1d(torch.randn(10), 10**12), (VE,)),
    ("compress.kmeans_rows iters -1", lambda: C.kmeans_rows(torch.randn(3, 5), 2, iters=-1), (VE,)),
    ("compress.share_weights iters 1.5", lambda: C.share_weights(torch.randn(8), iters=1.5), (TE,)),
    ("compress.huffman_encode chunk -1", lambda: C.huffman_encode(np.arange(10), chunk=-1), (VE,)),
    ("storage.checkpoint_bytes None", lambda: ST.checkpoint_bytes(None), (TE,)),
    ("storage.checkpoint_bytes a folder that is no checkpoint", lambda: ST.checkpoint_bytes(LABKIT_DIR), (FNF,)),
    ("storage.default_sparse_names str", lambda: ST.default_sparse_names("m"), (TE,)),
    ("storage.logits_after_load float input_ids", lambda: ST.logits_after_load(_ckpt(), torch.rand(1, 4), lazy=True),
     (TE,)),
    ("storage.logits_after_load ids >= vocab", lambda: ST.logits_after_load(_ckpt(), torch.full((1, 4), 999),
                                                                          lazy=True), (VE,)),
    ("storage.logits_after_load threads 0", lambda: ST.logits_after_load(_ckpt(), torch.zeros(1, 4, dtype=torch.long),
                                                                       lazy=True, threads=0), (VE,)),
    ("storage.compare_loads 1-D input_ids", lambda: ST.compare_loads(_ckpt(), torch.zeros(4, dtype=torch.long)), (VE,)),
    ("storage.SparseCheckpoint.get unknown name", lambda: ST.SparseCheckpoint.open(_ckpt()).get("nope"), (VE,)),
    ("storage.SparseCheckpoint.get_many str", lambda: ST.SparseCheckpoint.open(_ckpt()).get_many("lm_head.weight"),
     (TE,)),
    # stored_matrix / compressed_format / capstone (notebook 07)
    ("stored_matrix.share w None", lambda: lk.capstone.share(None, 3), (TE,)),
    ("stored_matrix.share bits 10**12", lambda: lk.capstone.share(_w(), 10**12), (VE,)),
    ("stored_matrix.share sample 0", lambda: lk.capstone.share(_w(), 3, sample=0), (VE,)),
    ("stored_matrix.share_rows bits True", lambda: lk.capstone.share_rows(_w(), True), (TE,)),
    ("stored_matrix.encode_codes unknown entropy", lambda: lk.capstone.encode_codes(np.zeros(8, np.uint8), 3, "lz4"),
     (VE,)),
    ("stored_matrix.encode_codes bits 1.5", lambda: lk.capstone.encode_codes(np.zeros(8, np.uint8), 1.5, "zstd"),
     (TE,)),
    ("stored_matrix.encode_codes list", lambda: lk.capstone.encode_codes([0, 1], 3, "zstd"), (TE,)),
    ("stored_matrix.decode_codes parts {}", lambda: lk.capstone.decode_codes({}, {"bits": 3}, 8), (VE,)),
    ("stored_matrix.decode_matrix {}", lambda: lk.capstone.decode_matrix({}), (VE,)),
    ("stored_matrix.encode_matrix recipe dict", lambda: lk.capstone.encode_matrix(_w(), {"quant": "int"}), (TE,)),
    ("stored_matrix.encode_matrix w numpy", lambda: lk.capstone.encode_matrix(_w().numpy(), lk.capstone.Recipe()),
     (TE,)),
    ("compressed_format.unique_state None", lambda: lk.capstone.unique_state(None), (TE,)),
    ("compressed_format.count_stage_bytes entries list", lambda: lk.capstone.count_stage_bytes(
        [], lk.capstone.Recipe()), (TE,)),
    ("compressed_format.ram_formula_bytes dict", lambda: lk.capstone.ram_formula_bytes({}), (TE,)),
    ("compressed_format.read_report None", lambda: lk.capstone.read_report(None), (TE,)),
    ("compressed_format.load_compressed dtype int8", lambda: lk.capstone.load_compressed("/nonexistent", dtype=torch.int8),
     (TE,)),
    ("compressed_format.load_compressed convert str", lambda: lk.capstone.load_compressed("/nonexistent", convert="x"),
     (TE,)),
    ("compressed_format.SafetensorsReader chunk_bytes 0", lambda: lk.capstone.SafetensorsReader("/nonexistent", 0),
     (VE,)),
    ("compressed_format.export tokenizer str", lambda: lk.capstone.export(_packed(), "/tmp/lk-never-export",
                                                                           tokenizer="gpt2"), (TE,)),
    ("compressed_format.export extra list", lambda: lk.capstone.export(_packed(), "/tmp/lk-never-export", extra=[]),
     (TE,)),
    ("capstone.Recipe.from_dict list", lambda: lk.capstone.Recipe.from_dict(["quant", "int"]), (TE,)),
    ("capstone.recode dict", lambda: lk.capstone.recode({}, "zstd"), (TE,)),
    ("capstone.compress_ model None", lambda: lk.capstone.compress_(None, lk.capstone.Recipe()), (TE,)),
    ("capstone.compress_ masks str", lambda: lk.capstone.compress_(Mo.tiny_llama(), lk.capstone.Recipe(sparsity=0.5),
                                                                   masks="m"), (TE,)),
    ("capstone.pareto_front unknown key", lambda: lk.capstone.pareto_front(_points(), x="size"), (VE,)),
    ("capstone.pareto_front str", lambda: lk.capstone.pareto_front("points"), (TE,)),
    ("capstone.beyond_single [None]", lambda: lk.capstone.beyond_single([None]), (VE,)),
    ("capstone.parse_budget 1.5 bytes", lambda: lk.capstone.parse_budget(1.5, 1000), (VE,)),
    ("capstone.parse_budget fp32_bytes 0", lambda: lk.capstone.parse_budget(0.25, 0), (VE,)),
    ("capstone.parse_budget fp32_bytes inf", lambda: lk.capstone.parse_budget(0.25, float("inf")), (TE,)),
    ("capstone.best_recipe budget nan", lambda: lk.capstone.best_recipe(_points(), float("nan")), (VE,)),
    ("capstone.best_recipe unknown key", lambda: lk.capstone.best_recipe(_points(), 150, key="ram"), (VE,)),
    ("capstone.best_recipe no points", lambda: lk.capstone.best_recipe([], 150), (VE,)),
    ("capstone.search_points {}", lambda: lk.capstone.search_points({}), (VE,)),    # pool / kvcache (notebook 05)
    ("pool.BlockPool num_blocks 10**12", lambda: lk.pool.BlockPool(10**12, (4,)), (VE,)),
    ("pool.BlockPool block_shape (1.5,)", lambda: lk.pool.BlockPool(4, (1.5,)), (TE,)),
    ("pool.BlockPool dtype str", lambda: lk.pool.BlockPool(4, (4,), dtype="float32"), (TE,)),
    ("pool.BlockPool.allocate_many inf", lambda: lk.pool.BlockPool(4, (4,)).allocate_many(float("inf")), (TE,)),
    ("pool.BlockPool.set_fill 1.5", lambda: _block_pool().set_fill(0, 1.5), (TE,)),
    ("pool.VariableAllocator capacity 10**12", lambda: lk.pool.VariableAllocator(10**12), (VE,)),
    ("pool.churn max_size below min_size", lambda: lk.pool.churn(min_size=16, max_size=8), (VE,)),
    ("pool.churn seed -1", lambda: lk.pool.churn(seed=-1), (VE,)),
    ("pool.churn n_ops 10**12", lambda: lk.pool.churn(n_ops=10**12), (VE,)),
    ("pool.make_requests rate 0", lambda: lk.pool.make_requests(10, rate=0.0), (VE,)),
    ("pool.make_requests n 10**12", lambda: lk.pool.make_requests(10**12), (VE,)),
    ("pool.make_requests max_len too short for 'short'", lambda: lk.pool.make_requests(10, dist="short", max_len=32),
     (VE,)),
    ("pool.simulate no requests", lambda: lk.pool.simulate([], 2048), (TE,)),
    ("pool.simulate budget 10**12", lambda: lk.pool.simulate(lk.pool.make_requests(5, max_len=64), 10**12,
                                                              max_len=64), (VE,)),
    ("pool.sequences_that_fit max_len 0", lambda: lk.pool.sequences_that_fit([10], 100, "contiguous", max_len=0),
     (VE,)),
    ("pool.sequences_that_fit lengths str", lambda: lk.pool.sequences_that_fit("10", 100), (TE,)),
    ("pool.paged_waste_bound length 0", lambda: lk.pool.paged_waste_bound(0, 16), (VE,)),
    ("kvcache.PagedKVCache config dict", lambda: lk.kvcache.PagedKVCache({"num_hidden_layers": 2}), (TE,)),
    ("kvcache.PagedKVCache block_size 1.5", lambda: lk.kvcache.PagedKVCache(_tiny().config, block_size=1.5), (TE,)),
    ("kvcache.PagedKVCache num_blocks 10**12", lambda: lk.kvcache.PagedKVCache(_tiny().config, num_blocks=10**12),
     (VE,)),
    ("kvcache.PagedKVCache.update layer_idx 5", lambda: _paged().update(torch.randn(1, 2, 3, 16), torch.randn(1, 2, 3, 16),
                                                                        5), (VE,)),
    ("kvcache.PagedKVCache.update value_states None", lambda: _paged().update(torch.randn(1, 2, 3, 16), None, 0), (TE,)),
    ("kvcache.PagedKVCache.fork src 10**12", lambda: _paged(filled=True).fork(10**12), (VE,)),
    ("kvcache.PagedKVCache.fork n 10**12", lambda: _paged(filled=True).fork(0, 10**12), (VE,)),
    ("kvcache.PagedKVCache.free_sequence True", lambda: _paged(filled=True).free_sequence(True), (TE,)),
    ("kvcache.PagedKVCache.block_kv block 10**12", lambda: _paged(filled=True).block_kv(0, 10**12, 2), (VE,)),
    ("kvcache.quantize_kv bits True", lambda: lk.kvcache.quantize_kv(torch.randn(2, 16), True, 8), (TE,)),
    ("kvcache.quantize_kv group_size 0", lambda: lk.kvcache.quantize_kv(torch.randn(2, 16), 8, 0), (VE,)),
    ("kvcache.quantize_kv NaN", lambda: lk.kvcache.quantize_kv(_w(nan=True), 8, 8), (VE,)),
    ("kvcache.dequantize_kv scale of another shape", lambda: lk.kvcache.dequantize_kv(
        torch.zeros(2, 16, dtype=torch.int8), torch.ones(3, 2), 8), (VE,)),
    ("kvcache.kv_cache_table seq_len nan", lambda: lk.kvcache.kv_cache_table(_tiny().config, float("nan")), (TE,)),
    ("kvcache.shared_prefix_blocks block_size 0", lambda: lk.kvcache.shared_prefix_blocks(2, 8, 16, 0), (VE,)),
    ("kvcache.shared_prefix_blocks prefix longer than total", lambda: lk.kvcache.shared_prefix_blocks(2, 32, 16, 4),
     (VE,)),
    ("kvcache.paged_attention_decode view None", lambda: lk.kvcache.paged_attention_decode(torch.randn(1, 4, 1, 16),
                                                                                           None), (TE,)),
    ("kvcache.sample_parallel model str", lambda: lk.kvcache.sample_parallel("m", _ids(8).reshape(1, 8)), (TE,)),
    ("kvcache.sample_parallel ids >= vocab", lambda: lk.kvcache.sample_parallel(_tiny(), _ids(8).reshape(1, 8) + 300),
     (VE,)),
    ("kvcache.sample_parallel block_size 0", lambda: lk.kvcache.sample_parallel(_tiny(), _ids(8).reshape(1, 8),
                                                                               block_size=0), (VE,)),
    ("kvcache.sample_parallel max_new_tokens 10**12", lambda: lk.kvcache.sample_parallel(
        _tiny(), _ids(8).reshape(1, 8), max_new_tokens=10**12), (VE,)),
    ("kvcache.sample_parallel seed 1.5", lambda: lk.kvcache.sample_parallel(_tiny(), _ids(8).reshape(1, 8), seed=1.5),
     (TE,)),
    ("kvcache.generate_shared_prefix float ids", lambda: lk.kvcache.generate_shared_prefix(
        _tiny(), torch.rand(1, 8), _ids(8).reshape(2, 4)), (TE,)),    # sharding / footprint (notebooks 06, 00)
    ("sharding.TinyLM vocab_size -1", lambda: lk.sharding.TinyLM(vocab_size=-1), (VE,)),
    ("sharding.TinyLM layers 10**12", lambda: lk.sharding.TinyLM(layers=10**12), (VE,)),
    ("sharding.Block hidden 1.5", lambda: lk.sharding.Block(1.5), (TE,)),
    ("sharding.build_model cfg list", lambda: lk.sharding.build_model([]), (TE,)),
    ("sharding.build_model cfg None value", lambda: lk.sharding.build_model({"hidden_size": None}), (TE,)),
    ("sharding.train_single unknown cfg key", lambda: lk.sharding.train_single({"hiden_size": 8}), (VE,)),
    ("sharding.max_weight_diff list", lambda: lk.sharding.max_weight_diff([], {}), (TE,)),
    ("sharding.compare_sharded modes str", lambda: lk.sharding.compare_sharded(2, modes="zero1"), (VE,)),
    ("sharding.compare_sharded timeout -1", lambda: lk.sharding.compare_sharded(2, timeout=-1.0), (VE,)),
    ("sharding.launch args str", lambda: lk.sharding.launch(lk.sharding.sleeping_worker, 2, args="0.1"), (TE,)),
    ("sharding.launch gloo_timeout nan", lambda: lk.sharding.launch(lk.sharding.sleeping_worker, 2, args=(0.1,),
                                                                    gloo_timeout=float("nan")), (VE,)),
    ("footprint.estimate_footprint n_params -1", lambda: lk.footprint.estimate_footprint(_tiny().config, -1), (VE,)),
    ("footprint.estimate_footprint batch 1.5", lambda: lk.footprint.estimate_footprint(_tiny().config, 10, batch=1.5),
     (TE,)),
    ("footprint.estimate_footprint training str", lambda: lk.footprint.estimate_footprint(_tiny().config, 10,
                                                                                           training="yes"), (TE,)),
    ("footprint.measure_inference unknown name", lambda: lk.footprint.measure_inference("smollm3", [(1, 8)]), (VE,)),
    ("footprint.measure_inference shapes str", lambda: lk.footprint.measure_inference("smollm2-135m", "1x8"), (TE,)),
    ("footprint.measure_inference logits_to_keep 1.5", lambda: lk.footprint.measure_inference(
        "smollm2-135m", [(1, 8)], logits_to_keep=1.5), (TE,)),
    ("footprint.measure_inference batch 10**12", lambda: lk.footprint.measure_inference("smollm2-135m", [(10**12, 8)]),
     (VE,)),
    ("footprint.inference_peaks dtype int8", lambda: lk.footprint.inference_peaks("smollm2-135m", [(1, 8)], "int8"),
     (VE,)),
    ("footprint.measure_load name None", lambda: lk.footprint.measure_load(None), (TE,)),
    ("footprint.measure_training_step seq_len 0", lambda: lk.footprint.measure_training_step("smollm2-135m", 1, 0),
     (VE,)),
    ("footprint.training_step lr 1.5", lambda: lk.footprint.training_step("smollm2-135m", 1, 8, lr=1.5), (VE,)),    # the lower floors: repro, memory, models, data, evaluate
    ("repro.sha256_file chunk 0", lambda: R.sha256_file(R.REPO_ROOT / "README.md", 0), (VE,)),
    ("repro.sha256_file chunk 10**12", lambda: R.sha256_file(R.REPO_ROOT / "README.md", 10**12), (VE,)),
    ("repro.sha256_file path int", lambda: R.sha256_file(3), (TE,)),
    ("repro.file_entry None", lambda: R.file_entry(None), (TE,)),
    ("repro.check_file entry list", lambda: R.check_file(R.REPO_ROOT / "README.md", [], "fix it"), (TE,)),
    ("repro.read_verified empty path", lambda: R.read_verified("", "k", "fix it"), (VE,)),
    ("repro.read_verified_torch path int", lambda: R.read_verified_torch(3, "k", "fix it"), (TE,)),
    ("repro.read_manifest folder None", lambda: R.read_manifest(None, "k", "fix it"), (TE,)),
    ("repro.read_manifest verify None", lambda: R.read_manifest(R.REPO_ROOT, "k", "fix it", verify=None), (TE,)),
    ("repro.write_manifest files str", lambda: R.write_manifest(R.REPO_ROOT / "data", "k", files="a.txt"), (TE,)),
    ("repro.write_manifest kind None", lambda: R.write_manifest(R.REPO_ROOT / "data", None), (TE,)),
    ("repro.write_verified meta list", lambda: R.write_verified("/tmp/lk-never.bin", b"x", "k", meta=[]), (TE,)),
    ("repro.replace_folder tmp None", lambda: R.replace_folder(None, "/tmp/lk-never-dest"), (TE,)),
    ("repro.replace_folder tmp missing", lambda: R.replace_folder("/nonexistent/lk-tmp", "/tmp/lk-never-dest"), (FNF,)),
    ("repro.time_call min_run_time 1e12", lambda: R.time_call(lambda: None, min_run_time=1e12), (VE,)),
    ("repro.time_call n_threads 10**12", lambda: R.time_call(lambda: None, n_threads=10**12), (VE,)),
    ("distill.load_checkpoint path None", lambda: lk.distill.load_checkpoint(None), (TE,)),
    ("memory.kv_layout kv_heads above the heads", lambda: lk.memory.kv_layout(_tiny().config, 10**12), (VE,)),
    ("memory.estimate_activation_bytes training str", lambda: lk.memory.estimate_activation_bytes(
        _tiny().config, 1, 8, training="yes"), (TE,)),
    ("memory.measure_memory interval 1e12", lambda: lk.memory.measure_memory(1e12).__enter__(), (VE,)),
    ("models.resolve None", lambda: Mo.resolve(None), (TE,)),
    ("models.tiny_llama num_hidden_layers 10**12", lambda: Mo.tiny_llama(num_hidden_layers=10**12), (VE,)),
    ("models.tiny_llama hidden_size 10**12", lambda: Mo.tiny_llama(hidden_size=2**40, num_attention_heads=2,
                                                                    num_key_value_heads=2), (VE,)),
    ("models.generate BertModel", lambda: Mo.generate(_bert(), _tok(), "Hi"), (TE,)),
    ("models.generate empty prompt", lambda: Mo.generate(Mo.tiny_llama(vocab_size=49152), _tok(), ""), (VE,)),
    ("models.generate max_new_tokens 10**12", lambda: Mo.generate(Mo.tiny_llama(vocab_size=49152), _tok(), "Hi",
                                                                  max_new_tokens=10**12), (VE,)),
    ("models.empty_model config {}", lambda: Mo.empty_model({}), (TE,)),
    ("models.empty_model unknown attn_implementation", lambda: Mo.empty_model(_tiny().config.to_dict(), "fast"), (VE,)),
    ("data.batches seed 1.5", lambda: D.batches("validation", _tok(), seed=1.5), (TE,)),
    ("data.batches batch_size 0", lambda: D.batches("validation", _tok(), batch_size=0), (VE,)),
    ("data.batches batch_size 10**12", lambda: D.batches("validation", _tok(), batch_size=10**12), (VE,)),
    ("data.kjv_sentences n 0", lambda: D.kjv_sentences(0), (VE,)),
    ("evaluate.perplexity Sequential", lambda: lk.perplexity(_seq(), _ids(600), max_tokens=256), (TE,)),
    ("evaluate.perplexity windows longer than the model reads", lambda: lk.perplexity(
        Mo.tiny_llama(max_position_embeddings=64), _ids(600), max_tokens=256), (VE,)),
    ("evaluate.perplexity NaN weights", lambda: lk.perplexity(_poisoned(float("nan")), _ids(600), max_tokens=256),
     (VE,)),
    ("evaluate.Perplexity value nan", lambda: lk.evaluate.Perplexity(float("nan"), 1024), (VE,)),
    ("evaluate.ppl_label inf", lambda: lk.evaluate.ppl_label(float("inf")), (TE,)),    # training (notebook 06)
    ("training.batches tokens 0-d", lambda: lk.training.batches(torch.tensor(5), 2, 2, 16), (VE,)),
    ("training.batches steps 10**12", lambda: lk.training.batches(_ids(4096), 10**12, 2, 16), (VE,)),
    ("training.batches seed 1.5", lambda: lk.training.batches(_ids(4096), 2, 2, 16, seed=1.5), (TE,)),
    ("training.eval_loss seq_len 0", lambda: lk.training.eval_loss(_tiny(), _ids(4096), seq_len=0), (VE,)),
    ("training.eval_loss max_windows 0", lambda: lk.training.eval_loss(_tiny(), _ids(4096), max_windows=0), (VE,)),
    ("training.eval_loss Sequential", lambda: lk.training.eval_loss(_seq(), _ids(4096)), (TE,)),
    ("training.eval_loss float tokens", lambda: lk.training.eval_loss(_tiny(), torch.rand(4096)), (TE,)),
    ("training.is_tied Sequential", lambda: lk.training.is_tied(_seq()), (TE,)),
    ("training.untie_ None", lambda: lk.training.untie_(None), (TE,)),
    ("training.share_ BertModel", lambda: lk.training.share_(_bert(), lk.training.ShareConfig(2)), (TE,)),
    ("training.share_ filter_fn int", lambda: lk.training.share_(Mo.tiny_llama(), lk.training.ShareConfig(2), 3), (TE,)),
    ("training.sqrt_interval inf", lambda: lk.training.sqrt_interval(float("inf")), (TE,)),
    ("training.resolve_interval depth 0", lambda: lk.training.resolve_interval("sqrt", 0), (VE,)),
    ("training.checkpoint_ str", lambda: lk.training.checkpoint_("m"), (TE,)),
    ("training.accumulate_grads micro_batches 0", lambda: lk.training.accumulate_grads(
        Mo.tiny_llama(), _ids(64).reshape(4, 16), micro_batches=0), (VE,)),
    ("training.accumulate_grads ids >= vocab", lambda: lk.training.accumulate_grads(
        Mo.tiny_llama(), _ids(64).reshape(4, 16) + 300), (VE,)),
    ("training.accumulate_grads BertModel", lambda: lk.training.accumulate_grads(_bert(), _ids(64).reshape(4, 16)),
     (TE,)),
    ("training.train lr inf", lambda: lk.training.train(Mo.tiny_llama(), _ids(64).reshape(2, 2, 16), lr=float("inf")),
     (VE,)),
    ("training.train data 2-D", lambda: lk.training.train(Mo.tiny_llama(), _ids(64).reshape(4, 16)), (VE,)),
    ("training.train optimizer str", lambda: lk.training.train(Mo.tiny_llama(), _ids(64).reshape(2, 2, 16),
                                                               optimizer="adam"), (TE,)),
    ("training.saved_activation_bytes float x", lambda: lk.training.saved_activation_bytes(
        _tiny(), torch.rand(2, 16)), (TE,)),
    ("training.optimizer_state_bytes None", lambda: lk.training.optimizer_state_bytes(None), (TE,)),
    ("training.activation_bytes cfg dict", lambda: lk.training.activation_bytes({"hidden_size": 64}, 2, 16), (TE,)),
    ("training.estimate_stack cfg str", lambda: lk.training.estimate_stack(10**6, "small"), (TE,)),
    ("training.step_estimate n nan", lambda: lk.training.step_estimate(lk.training.SMALL, float("nan"), 2, 16), (VE,)),
    ("training.optimizer_estimates None", lambda: lk.training.optimizer_estimates(None), (TE,)),
    ("training.lowbit_adam params None", lambda: lk.training.lowbit_adam(None), (TE,)),
    ("training.state_after_step opt None", lambda: lk.training.state_after_step(Mo.tiny_llama(), None,
                                                                                _ids(32).reshape(2, 16)), (TE,)),
    ("training.measure_step cfg list", lambda: lk.training.measure_step([]), (TE,)),
    ("training.time_variants variants list", lambda: lk.training.time_variants([]), (TE,)),
    ("training.time_variants repeats 0", lambda: lk.training.time_variants({"fp32": {}}, repeats=0), (VE,)),
    ("training.step_memory batch 10**12", lambda: lk.training.step_memory(batch=10**12), (VE,)),
    ("training.step_memory seq_len 0", lambda: lk.training.step_memory(seq_len=0), (VE,)),
    ("training.step_memory cfg dict", lambda: lk.training.step_memory(cfg={"hidden_size": 64}), (TE,)),
]
_CACHE: dict = {}


def _tok():
    if "tok" not in _CACHE:
        from transformers import AutoTokenizer
        _CACHE["tok"] = AutoTokenizer.from_pretrained(str(Mo.prepare("smollm2-135m")))
    return _CACHE["tok"]


def _tiny():
    if "tiny" not in _CACHE:
        _CACHE["tiny"] = Mo.tiny_llama(seed=0)
    return _CACHE["tiny"]


def _ids(n: int) -> torch.Tensor:
    return torch.arange(n) % 256


def _w(nan: bool = False, inf: bool = False) -> torch.Tensor:
    w = torch.randn(8, 16, generator=torch.Generator().manual_seed(0))
    w[0, 0] = float("nan") if nan else float("inf") if inf else w[0, 0]
    return w


def _hess(nan: bool = False) -> torch.Tensor:
    h = SO.hessian(torch.randn(64, 16, generator=torch.Generator().manual_seed(1)))
    h[0, 0] = float("nan") if nan else h[0, 0]
    return h


def _seq():
    return torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 8))


def _bert():
    from transformers import BertConfig, BertModel
    return BertModel(BertConfig(vocab_size=300, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                intermediate_size=64, max_position_embeddings=64))


def _logits(nan: bool = False) -> torch.Tensor:
    z = torch.randn(2, 8, 256, generator=torch.Generator().manual_seed(2))
    z[0, 0, 0] = float("nan") if nan else z[0, 0, 0]
    return z


def _labels() -> torch.Tensor:
    return torch.arange(16).reshape(2, 8)


def _seqs() -> torch.Tensor:
    return lk.distill.make_sequences(_ids(2000), 16, 4)


def _ckpt() -> Path:
    if "ckpt" not in _CACHE:
        import atexit
        import shutil
        import tempfile
        root = tempfile.mkdtemp(prefix="lk-bad-inputs-")
        atexit.register(shutil.rmtree, root, ignore_errors=True)
        folder = Path(root) / "ck"
        ST.save_sparse(Mo.tiny_llama(seed=0), folder, fmt="csr")
        _CACHE["ckpt"] = folder
    return _CACHE["ckpt"]


def _packed():
    return lk.capstone.compress_(Mo.tiny_llama(seed=0), lk.capstone.Recipe(quant="int", bits=4))


def _points() -> list[dict]:
    return [{"name": "a", "bytes": 100, "ppl": 30.0}, {"name": "b", "bytes": 50, "ppl": 40.0}]


def _block_pool():
    p = lk.pool.BlockPool(4, (4,))
    p.allocate()
    return p


def _paged(filled: bool = False):
    c = lk.kvcache.PagedKVCache(_tiny().config, num_blocks=16, block_size=4)
    for layer in range(2 if filled else 0):
        c.update(torch.randn(1, 2, 6, 16), torch.randn(1, 2, 6, 16), layer)
    return c


def _huffman():
    rng = np.random.default_rng(0)
    return C.huffman_encode(rng.geometric(0.3, size=500))


def _truncated_huffman():
    enc = _huffman()
    return C.HuffmanEncoded(enc.payload[: len(enc.payload) // 2], enc.n_bits, enc.shape, enc.dtype, enc.symbols,
                            enc.lengths, enc.crc32)


def _flipped_huffman():
    enc = _huffman()
    p = bytearray(enc.payload)
    p[len(p) // 2] ^= 0x10
    return C.HuffmanEncoded(bytes(p), enc.n_bits, enc.shape, enc.dtype, enc.symbols, enc.lengths, enc.crc32)


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_gives_a_clear_labkit_error(case):
    _, call, exc = case
    clear_error(call, exc)


@pytest.mark.parametrize("case", OTHER_CASES, ids=[c[0] for c in OTHER_CASES])
def test_other_modules_bad_input(case):
    _, call, exc = case
    clear_error(call, exc)


@pytest.mark.parametrize("case", LESSON_CASES, ids=[c[0] for c in LESSON_CASES])
def test_lesson_modules_bad_input(case):
    _, call, exc = case
    clear_error(call, exc)


# ----------------------------------------------------------------------------------------------- all-or-nothing transforms
def _state_hash(model) -> str:
    return hashlib.sha256(b"".join(t.detach().contiguous().numpy().tobytes()
                                   for _, t in sorted(model.state_dict().items()))).hexdigest()


def _poisoned(value: float, layer: int = 1, **sizes):
    model = Mo.tiny_llama(seed=0, num_hidden_layers=3, **sizes)
    with torch.no_grad():
        model.model.layers[layer].mlp.up_proj.weight[0, 0] = value
    return model


def _wanda_with_nan_norms(model):
    norms = lk.prune.collect_input_norms(model, torch.arange(2048) % 256)
    last = sorted(norms)[-1]
    norms[last] = norms[last].clone()
    norms[last][0] = float("nan")
    return lk.prune.prune_(model, lk.prune.PruneConfig(method="wanda", sparsity=0.5), input_norms=norms)


TRANSFORMS = {   # a transform that fails on a later layer must leave the model exactly as it was
    "quantize_ NaN in layer 1": (lambda: _poisoned(float("nan")),
                                 lambda m: lk.quantize.quantize_(m, lk.quantize.QuantConfig(bits=4, group_size=32))),
    "quantize_ 1e7 overflows fp16 scales": (lambda: _poisoned(1e7),
                                            lambda m: lk.quantize.quantize_(m, lk.quantize.QuantConfig(bits=4))),
    "prune_ N:M that fits no layer": (lambda: Mo.tiny_llama(seed=0),
                                      lambda m: lk.prune.prune_(m, lk.prune.PruneConfig(method="nm", n=3, m=7))),
    "prune_ wanda NaN norms": (lambda: Mo.tiny_llama(seed=0), _wanda_with_nan_norms),
    "compress_ group fits some matrices": (lambda: Mo.tiny_llama(seed=0, intermediate_size=96),
                                           lambda m: lk.capstone.compress_(m, lk.capstone.Recipe(
                                               sparsity=0.5, quant="int", bits=4, group_size=64))),
    "compress_ NaN in layer 1": (lambda: _poisoned(float("nan")),
                                 lambda m: lk.capstone.compress_(m, lk.capstone.Recipe(quant="int", bits=4))),
    "recovery_finetune_ masks str": (lambda: Mo.tiny_llama(seed=0),   # used to train, then fail applying them
                                     lambda m: lk.prune.recovery_finetune_(m, _ids(4096), masks="mask", steps=2,
                                                                           seq_len=16, batch_size=2)),
    "prune_mlp_neurons_ bad norm in layer 1": (lambda: Mo.tiny_llama(seed=0), lambda m: lk.prune.prune_mlp_neurons_(
        m, 0.5, {"model.layers.0.mlp.down_proj": torch.ones(128), "model.layers.1.mlp.down_proj": torch.ones(5)})),
    "gptq_ group fits some matrices": (lambda: Mo.tiny_llama(seed=0, intermediate_size=96),
                                       lambda m: SO.gptq_(m, _ids(32).reshape(2, 16), Q.QuantConfig(4, group_size=64))),
    "awq_ group fits some matrices": (lambda: Mo.tiny_llama(seed=0, intermediate_size=96),
                                      lambda m: A.awq_(m, _ids(32).reshape(2, 16), Q.QuantConfig(4, group_size=64))),
    "awq_ clip per tensor": (lambda: Mo.tiny_llama(seed=0),
                             lambda m: A.awq_(m, _ids(32).reshape(2, 16), Q.QuantConfig(4, granularity="tensor"))),
}

@pytest.mark.parametrize("name", list(TRANSFORMS))
def test_a_transform_that_fails_changes_nothing(name):
    build, transform = TRANSFORMS[name]
    model = build()
    before = _state_hash(model)
    modules = [type(m) for m in model.modules()]
    clear_error(lambda: transform(model), (VE, TE))
    assert [type(m) for m in model.modules()] == modules and _state_hash(model) == before


def test_compress_cli_refuses_bad_outputs_before_any_work(tmp_path, monkeypatch, capsys):
    """`python -m labkit compress --out` checks its folder and budget before a model is loaded."""
    from labkit.__main__ import main

    def no_model(*a, **k):
        raise AssertionError("a model was loaded before the arguments were checked")
    monkeypatch.setattr(Mo, "load_model", no_model)
    user = tmp_path / "mine"
    user.mkdir()
    (user / "notes.md").write_text("my notes")
    (user / "report.json").write_text('{"kind": "mine"}')
    data_dir = Path(lk.__file__).resolve().parent.parent / "data"
    before, data_before = folder_hash(user), folder_hash(data_dir)
    for out, extra in [(user, []), (user / "notes.md", []), (data_dir, []), (data_dir / "export", []),
                       (tmp_path / "new", ["--tokens", "0"]), (tmp_path / "new", ["--tokens", "-5"]),
                       (tmp_path / "new", ["--budget", "0"]), (tmp_path / "no" / "parent", [])]:
        argv = ["compress", "--budget", "0.3", "--out", str(out), *extra]
        if "--budget" in extra:
            argv = ["compress", "--out", str(out), *extra]
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("compress: ") and "Traceback" not in err, err
    assert folder_hash(user) == before and folder_hash(data_dir) == data_before
    assert not (tmp_path / "new").exists()


# ----------------------------------------------------------------------------------------------- degenerate but valid
@pytest.mark.parametrize("fmt", S.FORMATS)
@pytest.mark.parametrize("shape", [(0, 8), (4, 0), (1, 4)])
def test_empty_and_tiny_matrices_round_trip(fmt, shape):
    w = torch.zeros(shape)
    s = S.to_format(w, fmt, blocksize=(1, 4) if shape[1] else (1, 1))
    assert s.to_dense().shape == w.shape and torch.equal(s.to_dense(), w)


@pytest.mark.parametrize("fmt", ["dense", "coo", "csr", "csr32", "bsr", "bitmap"])
def test_nan_and_inf_are_stored_exactly(fmt):
    w = torch.tensor([[float("nan"), 0.0, float("inf"), -float("inf")], [0.0, -0.0, 1e-45, 3.0]])
    back = S.to_format(w, fmt, blocksize=(1, 4)).to_dense()
    assert torch.equal(back.view(torch.int32), w.view(torch.int32)) or fmt in ("coo", "csr", "csr32", "bitmap") \
        and torch.equal(back.nan_to_num(7.0), w.nan_to_num(7.0))      # -0.0 is a zero: sparse formats drop it


def test_bf16_and_fp16_values_round_trip():
    for dt in (torch.bfloat16, torch.float16):
        w = S.random_sparse((8, 16), 0.3).to(dt)
        for fmt in ("coo", "csr", "bitmap", "bsr"):
            assert torch.equal(S.to_format(w, fmt, blocksize=(4, 4)).to_dense(), w)


def test_huge_symbol_values_do_not_allocate_a_table_per_value():
    x = np.array([0, 2**40, 2**40, 5], dtype=np.int64)
    enc = C.huffman_encode(x)
    assert np.array_equal(C.huffman_decode(enc), x)


def test_empty_symbols():
    enc = C.huffman_encode(np.zeros(0, dtype=np.int64))
    assert C.huffman_decode(enc).size == 0 and C.entropy(np.zeros(0, dtype=np.int64)) == 0.0
    assert C.pack_bits(torch.zeros(0, dtype=torch.uint8), 3).numel() == 0


# ----------------------------------------------------------------------------------------------- files
@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    model = Mo.tiny_llama(seed=0)
    lk.prune.prune_(model, lk.prune.PruneConfig(method="nm", n=2, m=4))
    folder = tmp_path_factory.mktemp("ck") / "tiny-2of4"
    ST.save_sparse(model, folder, fmt="2:4", chunk_bytes=30_000)
    return model, folder


def _load_both(folder):
    ST.load_full(folder)
    m = ST.load_lazy(folder)
    with torch.no_grad():
        m(torch.zeros(1, 4, dtype=torch.long))


def test_storage_bad_arguments_change_no_file(checkpoint, tmp_path):
    model, folder = checkpoint
    before = folder_hash(folder)
    for call, exc in [(lambda: ST.save_sparse(model, folder, fmt="ell"), VE),
                      (lambda: ST.save_sparse(model, folder, chunk_bytes=0), VE),
                      (lambda: ST.save_sparse(model, folder, chunk_bytes=2.5), TE),
                      (lambda: ST.save_sparse(model, folder, sparse_names={"nope.weight"}), VE),
                      (lambda: ST.save_sparse(model, folder, sparse_names="model.layers.0.mlp.up_proj.weight"), TE),
                      (lambda: ST.save_sparse(Mo.tiny_llama(seed=3), folder, fmt="2:4"), VE),
                      (lambda: ST.save_sparse(model, folder / "index.json"), VE),
                      (lambda: ST.save_sparse(model, 3.5), TE),
                      (lambda: ST.save_sparse(ST.load_lazy(folder), tmp_path / "new"), VE),
                      (lambda: ST.load_lazy(folder, layers_fqn="model.nope"), VE),
                      (lambda: ST.load_lazy(folder, layers_fqn=3), TE)]:
        clear_error(call, exc)
    assert folder_hash(folder) == before
    assert not (tmp_path / "new").exists()
    assert [p.name for p in folder.parent.iterdir()] == [folder.name]   # no temporary folder left


def test_a_user_folder_is_never_touched(checkpoint, tmp_path):
    model, _ = checkpoint
    user = tmp_path / "mine"
    user.mkdir()
    (user / "index.json").write_text("my own index")
    (user / "chunk-00001.safetensors").write_bytes(b"my own chunk")
    (user / "notes.md").write_text("notes")
    before = folder_hash(user)
    clear_error(lambda: ST.save_sparse(model, user), VE)
    clear_error(lambda: ST.load_full(user), CE)
    assert folder_hash(user) == before


@pytest.mark.parametrize("damage", ["truncate-chunk", "empty-chunk", "delete-chunk", "foreign-chunk", "index-not-json",
                                    "index-foreign-json", "index-other-kind", "index-newer-version", "index-edited",
                                    "index-escapes-folder", "index-empty"])
def test_damaged_checkpoint_is_refused(checkpoint, tmp_path, damage):
    import shutil
    _, src = checkpoint
    folder = tmp_path / "ck"
    shutil.copytree(src, folder)
    chunk = sorted(folder.glob("chunk-*.safetensors"))[1]
    index_path = folder / "index.json"
    index = json.loads(index_path.read_text())
    if damage == "truncate-chunk":
        chunk.write_bytes(chunk.read_bytes()[:-100])
    elif damage == "empty-chunk":
        chunk.write_bytes(b"")
    elif damage == "delete-chunk":
        chunk.unlink()
    elif damage == "foreign-chunk":
        from safetensors.torch import save_file
        save_file({"x": torch.zeros(3)}, str(chunk))
    elif damage == "index-not-json":
        index_path.write_text("{not json")
    elif damage == "index-foreign-json":
        index_path.write_text('{"weights": [1, 2, 3]}')
    elif damage == "index-other-kind":
        index_path.write_text(json.dumps(dict(index, kind="labkit-compressed-export")))
    elif damage == "index-newer-version":
        index_path.write_text(json.dumps(dict(index, version=99)))
    elif damage == "index-edited":
        name = next(iter(index["tensors"]))
        index["tensors"][name]["dtype"] = "float16"
        index_path.write_text(json.dumps(index))
    elif damage == "index-escapes-folder":
        index["files"]["../outside.safetensors"] = index["files"].pop(chunk.name)
        index_path.write_text(json.dumps(index))
    elif damage == "index-empty":
        index_path.write_text("")
    before = folder_hash(folder)
    for loader in (ST.load_full, _load_both, lambda f: ST.SparseCheckpoint.open(f).state_dict()):
        clear_error(lambda: loader(folder), (CE,))
    assert folder_hash(folder) == before


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(which=st.integers(0, 10_000), pos=st.integers(0, 10**9), mask=st.integers(1, 255))
def test_random_byte_flips_in_a_checkpoint_are_detected(checkpoint, which, pos, mask):
    model, folder = checkpoint
    files = sorted(folder.iterdir())
    victim = files[which % len(files)]
    good = flip(victim, pos, mask)
    try:
        try:
            sd = ST.SparseCheckpoint.open(folder).state_dict()
        except ChecksumError as e:
            assert raised_in_labkit(e)
        else:   # only a flip that changes nothing the index means (e.g. JSON whitespace) may load — and loads right
            ref = model.state_dict()
            assert all(torch.equal(sd[k], ref[k]) for k in ref)
    finally:
        victim.write_bytes(good)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(pos=st.integers(0, 10**9), mask=st.integers(1, 255), sidecar=st.booleans())
def test_random_byte_flips_in_a_token_cache_are_rebuilt(tmp_path_factory, monkeypatch, pos, mask, sidecar):
    monkeypatch.setenv("LABKIT_CACHE", str(tmp_path_factory.mktemp("cache")))
    tok = _tok()
    good = D.tokens("validation", tok)
    path = D.token_cache_path("validation", tok)
    flip(path.with_name(path.name + ".sha256.json") if sidecar else path, pos, mask)
    again = D.tokens("validation", tok)
    assert torch.equal(again, good)
    R.read_verified(path, D.KIND, "rebuilt")                           # the cache on disk is good again


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(which=st.integers(0, 100), pos=st.integers(0, 10**9), mask=st.integers(1, 255))
def test_random_byte_flips_in_a_model_cache_are_detected(tmp_path_factory, which, pos, mask):
    folder = tmp_path_factory.mktemp("model")
    for name, data in {"config.json": b'{"a": 1}', "model.safetensors": bytes(range(256)) * 4}.items():
        (folder / name).write_bytes(data)
    R.write_manifest(folder, Mo.KIND, name=Mo.MANIFEST, extra={"source": "x", "source_sha256": "0" * 64})
    files = sorted(folder.iterdir())
    victim = files[which % len(files)]
    flip(victim, pos, mask)
    if victim.name == Mo.MANIFEST:      # a flip inside the manifest's own JSON: refused unless it changed nothing
        try:
            m = json.loads(victim.read_text())
            ok = m["files"] == {f.name: R.file_entry(f) for f in files if f.name != Mo.MANIFEST} and m["kind"] == Mo.KIND
        except (ValueError, KeyError, TypeError):
            ok = False
        assert ok or not Mo._cache_ok(folder, "smollm2-135m")      # accepted only if it still describes the files
    else:
        assert not Mo._cache_ok(folder, "smollm2-135m")


def test_interrupted_token_cache_write_leaves_no_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LABKIT_CACHE", str(tmp_path))
    tok = _tok()
    real = R.os.replace

    def dies(a, b):
        raise KeyboardInterrupt()
    monkeypatch.setattr(R.os, "replace", dies)
    with pytest.raises(KeyboardInterrupt):
        D.tokens("validation", tok)
    monkeypatch.setattr(R.os, "replace", real)
    assert not [p for p in (tmp_path / "tokens").iterdir() if not p.name.startswith(".")]
    assert not list((tmp_path / "tokens").iterdir())                    # no temp file left either
    assert len(D.tokens("validation", tok)) > 0


def test_text_file_is_only_read(tmp_path):
    f = tmp_path / "story.txt"
    f.write_text("Once upon a time there was a small model that wanted to remember everything. " * 20)
    before = folder_hash(tmp_path)
    D.text_tokens(f, _tok())
    clear_error(lambda: D.text_tokens(tmp_path, _tok()), (FNF, TE, VE))
    assert folder_hash(tmp_path) == before


# ----------------------------------------------------------------------------------------------- the CLI
CLI_CASES = [
    ["prepare", "--bogus"],
    ["clean", "/nonexistent/notebook.ipynb"],
    ["clean", "--check", "/nonexistent/notebook.ipynb"],
    ["execute"],
    ["execute", "/nonexistent/notebook.ipynb"],
    ["execute", "README.md"],
    ["student", "--bogus"],
    ["nope"],
]


@pytest.mark.parametrize("argv", CLI_CASES, ids=[" ".join(a) for a in CLI_CASES])
def test_cli_bad_arguments(argv, capsys):
    from labkit.__main__ import main
    root = Path(lk.__file__).resolve().parent.parent
    before = folder_hash(root / "notebooks")
    try:
        try:
            code = main(argv)
        except SystemExit as e:          # argparse: usage + message on stderr, exit status 2
            code = e.code
    finally:
        assert folder_hash(root / "notebooks") == before
    err = capsys.readouterr().err
    assert code not in (0, None), f"{argv} succeeded"
    assert "Traceback" not in err and len(err.strip()) > 10, err[-500:]
    assert folder_hash(root / "notebooks") == before


# ----------------------------------------------------------------------------------------------- counts for the notes
def summary() -> dict:
    """Run every table case outside pytest and count the outcomes (for the developer notes)."""
    rows = {"cases": 0, "clear": 0, "wrong type / raw": []}
    for name, call, exc in CASES + OTHER_CASES + LESSON_CASES:
        rows["cases"] += 1
        try:
            call()
            rows["wrong type / raw"].append(f"{name}: no error")
        except exc as e:
            if raised_in_labkit(e) and len(str(e)) >= 20:
                rows["clear"] += 1
            else:
                rows["wrong type / raw"].append(f"{name}: {type(e).__name__} from outside labkit: {str(e)[:80]}")
        except BaseException as e:   # noqa: BLE001 - counting
            rows["wrong type / raw"].append(f"{name}: {type(e).__name__}: {str(e)[:80]}")
    return rows


if __name__ == "__main__":
    print(json.dumps(summary(), indent=1))
    print(math.nan)
