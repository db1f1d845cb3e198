"""labkit.footprint: the estimate's components against ZeRO's arithmetic; measurements on a tiny saved model."""
import pytest
import torch
from tokenizers import Tokenizer, models
from transformers import PreTrainedTokenizerFast

import labkit as lk
from labkit import footprint as F


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny")
    lk.models.tiny_llama().save_pretrained(path)
    PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]"))
                            ).save_pretrained(path)
    return str(path)


def test_training_state_is_16_bytes_per_param_in_both_precisions(tiny):
    n = lk.count_params(tiny)
    for dtype in ("fp32", "bf16"):
        est = F.estimate_footprint(tiny.config, n, dtype, 2, 32, training=True)
        assert est["weights"] + est["gradients"] + est["master_weights"] + est["optimizer_state"] == 16 * n
        assert est["kv_cache"] == 0 and est["activations"] > 0


def test_inference_estimate_has_weights_and_exact_kv(tiny):
    n = lk.count_params(tiny)
    est = F.estimate_footprint(tiny.config, n, "bf16", 3, 40)
    assert est["weights"] == 2 * n
    assert est["kv_cache"] == lk.estimate_kv_cache_bytes(tiny.config, 3, 40, torch.bfloat16)
    with pytest.raises(ValueError, match="batch and seq_len"):
        F.estimate_footprint(tiny.config, n, "fp32", 0, 10)


def test_measured_kv_equals_estimate_and_training_state_is_exact(tiny_dir, tiny):
    rows = F.inference_peaks(tiny_dir, [(2, 16), (1, 64)])
    for r in rows:
        assert r["kv_bytes"] == lk.estimate_kv_cache_bytes(tiny.config, r["batch"], r["seq_len"])
        assert r["logits_bytes"] == r["batch"] * r["seq_len"] * tiny.config.vocab_size * 4
    step = F.training_step(tiny_dir, batch=2, seq_len=16)
    n = step["n_params"]
    assert step["gradients"] == 4 * n and step["optimizer_state"] >= 8 * n  # + Adam's step counters
    assert step["optimizer_state"] - 8 * n < 1000 and step["peak_bytes"] > 0
