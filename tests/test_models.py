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
    assert Mo._cache_ok(src, "smollm2-135m")
    with open(src / "config.json", "a") as f:
        f.write(" ")
    assert not Mo._cache_ok(src, "smollm2-135m")
    (src / Mo.MANIFEST).unlink()
    assert not Mo._cache_ok(src, "smollm2-135m")
    calls = []
    monkeypatch.setattr(Mo, "_convert_gguf", lambda name, out: (calls.append(out), shutil.copy(real / "config.json", out)))
    folder = Mo.prepare("smollm2-135m")
    assert calls and Mo._cache_ok(folder, "smollm2-135m") and json.loads((folder / Mo.MANIFEST).read_text())["files"]
    assert not list(folder.parent.glob(".smollm2-135m.*"))  # no temp folder left behind
    assert json.loads((folder / Mo.MANIFEST).read_text())["kind"] == Mo.KIND   # an lk.repro manifest


def test_manifest_of_an_older_labkit_is_verified_then_upgraded(tmp_path):
    from labkit import repro
    (tmp_path / "a.bin").write_bytes(b"weights")
    old = {"source": "x.gguf", "source_sha256": "0" * 64, "files": {"a.bin": repro.file_entry(tmp_path / "a.bin")}}
    (tmp_path / Mo.MANIFEST).write_text(json.dumps(old))
    assert Mo._cache_ok(tmp_path, "smollm2-135m")
    new = json.loads((tmp_path / Mo.MANIFEST).read_text())
    assert new["kind"] == Mo.KIND and new["version"] == repro.MANIFEST_VERSION and new["source"] == "x.gguf"
    (tmp_path / "a.bin").write_bytes(b"weightz")                       # same size, different bytes
    assert not Mo._cache_ok(tmp_path, "smollm2-135m")
    (tmp_path / Mo.MANIFEST).write_text(json.dumps(old))               # an old manifest over a changed file
    assert not Mo._cache_ok(tmp_path, "smollm2-135m")


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


# ---- lk.data: verified token caches, any other text --------------------------------------------------------
@pytest.fixture()
def tok():
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(str(Mo.prepare("smollm2-135m")))


def test_token_cache_is_verified_and_rebuilt(tmp_path, monkeypatch, tok, capsys):
    from labkit import data
    monkeypatch.setenv("LABKIT_CACHE", str(tmp_path))
    first = data.tokens("validation", tok)
    path = data.token_cache_path("validation", tok)
    assert path.with_name(path.name + ".sha256.json").exists()
    raw = bytearray(path.read_bytes())
    raw[-64:-56] = (6_100_000_000_000_000_000).to_bytes(8, "little")     # a token id of 6.1e18
    path.write_bytes(bytes(raw))
    again = data.tokens("validation", tok)
    assert torch.equal(again, first) and int(again.max()) < len(tok)
    assert "failed its sha256 check" in capsys.readouterr().err
    path.write_bytes(path.read_bytes()[:100])                              # truncated
    assert torch.equal(data.tokens("validation", tok), first)


def test_text_tokens_scores_any_text(tmp_path, tok):
    from labkit import data
    text = "It was the best of times, it was the worst of times, it was the age of wisdom. " * 30
    a = data.text_tokens(text, tok)
    f = tmp_path / "dickens.txt"
    f.write_text(text, encoding="utf-8")
    assert torch.equal(data.text_tokens(f, tok), a) and torch.equal(data.text_tokens(str(f), tok), a)
    assert a.dtype == torch.long and a.dim() == 1 and int(a[-1]) == tok.eos_token_id
    assert torch.equal(data.text_tokens([text, text], tok), torch.cat([a, a]))
    with pytest.raises(ValueError, match="empty"):
        data.text_tokens("   ", tok)
    with pytest.raises(ValueError, match="only .* tokens"):
        data.text_tokens("Too short.", tok)
    with pytest.raises(FileNotFoundError):
        data.text_tokens(tmp_path / "missing.txt", tok)
    (tmp_path / "bin.txt").write_bytes(b"\xff\xfe\x00\x81" * 100)
    with pytest.raises(ValueError, match="not UTF-8"):
        data.text_tokens(tmp_path / "bin.txt", tok)
    with pytest.raises(TypeError, match="str"):
        data.text_tokens(123, tok)
    with pytest.raises(TypeError, match="tokenizer"):
        data.text_tokens(text, "gpt2")


def test_text_tokens_can_be_scored_by_the_protocol(tok):
    import labkit as lk
    text = " ".join(f"Line {i}: the cat sat on the mat and looked at the dog." for i in range(60))
    model = Mo.tiny_llama(vocab_size=len(tok))
    ppl = lk.perplexity(model, lk.data.text_tokens(text, tok), max_tokens=256)
    assert ppl.tokens == 256 and ppl > 1


def test_build_llama_leaves_the_callers_random_state_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    a = Mo.tiny_llama(seed=7)
    assert torch.equal(torch.rand(3), expected)                      # drawn under fork_rng
    b = Mo.build_llama(Mo.LlamaSpec(), seed=7)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert not torch.equal(a.model.embed_tokens.weight, Mo.tiny_llama(seed=8).model.embed_tokens.weight)
    spec = Mo.LlamaSpec.from_hf(a.config)
    assert spec == Mo.LlamaSpec() and spec.head_dim == 16 and spec.to_hf().num_hidden_layers == 2
