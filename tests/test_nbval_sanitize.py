"""The nbval sanitizers replace what varies between runs and nothing else."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

CFG = Path(__file__).resolve().parent / "nbval_sanitize.cfg"


def sanitize(text: str) -> str:
    # the same parsing and order as nbval's get_sanitize_patterns / IPyNbFile.sanitize
    for regex, replace in re.findall("^regex: (.*)$\n^replace: (.*)$", CFG.read_text(), flags=re.M):
        text = re.sub(regex, replace, text)
    return text


@pytest.mark.parametrize("a, b", [
    ("<function f at 0x7f3a2b1c4d50>", "<function f at 0x55d0c0ffee00>"),
    ("100%|██████████| 30/30 [00:01<00:00, 20.13it/s]", "100%|██████████| 30/30 [00:03<00:00,  9.87it/s]"),
    ("  0%|          | 0/30 [00:00<?, ?it/s]", "  0%|          | 0/30 [00:00<?, ?it/s]"),
    ("generated at 15.2 tokens/s", "generated at 9.8 tokens/s"),
    ("1 step: 1.25s/it", "1 step: 3.50s/it"),
    ("forward took 12 ms, load 1.23 s", "forward took 31 ms, load 0.98 s"),
    ("Wall time: 3.4 µs", "Wall time: 870 ns"),
    ("saved to /tmp/tmpa1b2c3/model.safetensors", "saved to /tmp/tmpz9y8x7/model.safetensors"),
    ("/home/me/lab/.venv/lib/python3.11/site-packages/torch/nn/x.py:12: UserWarning",
     "/work/main/.venv/lib/python3.11/site-packages/torch/nn/x.py:12: UserWarning"),
    ("cache: /root/.cache/labkit/models", "cache: /home/me/.cache/labkit/models"),
    ("weights [331776, 331776] B, max |Δweight| vs 1 process 1.5e-05",
     "weights [331776, 331776] B, max |Δweight| vs 1 process 7.0e-05"),
])
def test_varying_text_is_sanitized_to_the_same_string(a, b):
    assert sanitize(a) == sanitize(b)


@pytest.mark.parametrize("text", [
    "parameters: 134,515,008 (538.1 MB in fp32)",
    "KV cache: 46,080 bytes/token; 30 layers, 9 heads, 3 kv heads",
    "bits of 1.0 in fp32: 0x3f800000",
    "perplexity 25.43 on 4096 tokens",
    "100%|██████████| 30/30",
    "✓ estimates within 10% of the measurements",
    "batch 8 × seq 256 → 12 steps",
    "loss 3.3484, learning rate 1e-02",
])
def test_stable_text_is_left_alone(text):
    assert sanitize(text) == text


def test_round_off_is_masked_but_the_bytes_beside_it_are_checked():
    line = "fsdp  per rank: Adam state [663660, 663660] B, weights [331776, 331776] B, max |Δweight| vs 1 process 1.5e-05"
    assert sanitize(line) == line.replace("1.5e-05", "ROUNDOFF")
    assert sanitize(line.replace("331776", "663552")) != sanitize(line)
