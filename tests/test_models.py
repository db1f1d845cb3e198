"""labkit.models on the real shipped models: cache integrity, offline errors, same outputs after reload."""
import json
import shutil

import pytest
import torch

import labkit as lk
from labkit import models as Mo


def test_registered_sources_match_their_checksums():
    for name in Mo.REGISTRY:
        assert Mo._verify_source(name).exists()


def test_smollm2_config_and_size(smollm2):
    model, tok = smollm2
    cfg = model.config
    assert (cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.hidden_size) == (30, 9, 3, 576)
    assert lk.count_params(model) == 134_515_008
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert next(model.parameters()).dtype == torch.float32 and not model.training


def test_corrupted_cache_is_detected_and_rebuilt(tmp_path, monkeypatch):
    monkeypatch.setenv("LABKIT_CACHE", str(tmp_path))
    src = Mo.model_cache_dir("smollm2-135m")
    # reuse the real cache files instead of converting again: copy them in, then damage one
    from labkit.repro import cache_dir
    monkeypatch.delenv("LABKIT_CACHE")
    real = Mo.prepare("smollm2-135m")
    monkeypatch.setenv("LABKIT_CACHE", str(tmp_path))
    assert cache_dir() == tmp_path
    shutil.copytree(real, src)
    assert Mo._cache_ok(src)
    with open(src / "config.json", "a") as f:
        f.write(" ")
    assert not Mo._cache_ok(src)
    (src / Mo.MANIFEST).unlink()
    assert not Mo._cache_ok(src)
    calls = []
    monkeypatch.setattr(Mo, "_convert_gguf", lambda name, out: (calls.append(out), shutil.copy(real / "config.json", out)))
    folder = Mo.prepare("smollm2-135m")
    assert calls and Mo._cache_ok(folder) and json.loads((folder / Mo.MANIFEST).read_text())["files"]
    assert not list(folder.parent.glob(".smollm2-135m.*"))  # no temp folder left behind


def test_unknown_model_gives_a_clear_error(monkeypatch):
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)  # as a learner offline
    with pytest.raises(OSError, match="registered name"):
        lk.load_model("surely-not/a-model-xyz")
    with pytest.raises(ValueError, match="unknown model"):
        Mo.prepare("gpt2")


def test_local_folder_round_trip(tmp_path, tiny):
    tiny.save_pretrained(tmp_path)
    from transformers import PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models
    PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]"))
                            ).save_pretrained(tmp_path)
    model, _ = lk.load_model(str(tmp_path))
    ids = torch.randint(0, 256, (1, 9))
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, tiny(input_ids=ids).logits)
    with pytest.raises(FileNotFoundError, match="config.json"):
        lk.load_model(str(tmp_path / "tokenizer.json"))


def test_greedy_generation_is_deterministic(smollm2):
    model, tok = smollm2
    a = Mo.generate(model, tok, "And God said", 8)
    assert a == Mo.generate(model, tok, "And God said", 8) and len(a) > 5


def test_minilm_embeddings_are_normalised():
    model, tok = lk.load_model("minilm")
    e = Mo.sentence_embeddings(model, tok, ["In the beginning", "In the beginning", "Jesus wept."])
    assert torch.allclose(e.norm(dim=-1), torch.ones(3), atol=1e-5)
    assert (e[0] @ e[1]).item() > 0.999 and (e[0] @ e[2]).item() < 0.9
