"""The README's notebook table: every notebook, with its measured Run All minutes and peak memory (from
data/results/runtimes.json, written by `python -m labkit results runtimes`) and the learner's time; each
notebook's header quotes the same minutes. Nothing in the lab points at files a learner does not have."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from labkit.experiments import runtimes

ROOT = Path(__file__).resolve().parent.parent
ROW = re.compile(r"^\|\s*\[(\d\d) · [^\]]+\]\((notebooks/\d\d_\w+\.ipynb)\)\s*\|([^|]+)\|\s*([\d.]+)\s*\|"
                 r"\s*([\d.]+) GB\s*\|\s*about (\d+)\s*\|\s*$")
HEADER = re.compile(r"\*\*Run All on a 2-core CPU:\*\* ([\d.]+) minutes?, peak ([\d.]+) GB of RAM")


def table_rows(text: str) -> list[tuple[str, ...]]:
    return [m.groups() for line in text.splitlines() if (m := ROW.match(line))]


def notebooks() -> list[Path]:
    return sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))


def test_row_parser_on_a_small_example():
    text = "| notebook | you will learn | Run All (min) | peak RAM | your time (min) |\n|---|---|---|---|---|\n" \
           "| [03 · Distillation](notebooks/03_distillation.ipynb) | a student learns | 1.5 | 2.1 GB | about 45 |\n"
    assert table_rows(text) == [("03", "notebooks/03_distillation.ipynb", " a student learns ", "1.5", "2.1", "45")]


def test_readme_table_lists_exactly_the_notebooks_with_their_measured_cost():
    rows = table_rows((ROOT / "README.md").read_text(encoding="utf-8"))
    listed = [path for _, path, *_ in rows]
    assert listed == [p.relative_to(ROOT).as_posix() for p in notebooks()], \
        "README's notebook table and notebooks/NN_*.ipynb differ: add or remove rows"
    measured = json.loads((ROOT / "data" / "results" / "runtimes.json").read_text())["notebooks"]
    for number, path, learn, minutes, gb, learner in rows:
        stem = Path(path).stem
        assert stem.startswith(number) and learn.strip(), f"row {number}"
        m = measured[stem]
        assert minutes == runtimes.run_all_minutes(m["run_all_seconds"]), \
            f"{stem}: README says {minutes} min, measured {m['run_all_seconds']} s; run `python -m labkit results runtimes`"
        assert abs(float(gb) * 1e9 - m["peak_rss_bytes"]) <= 0.10 * m["peak_rss_bytes"] + 0.05e9, \
            f"{stem}: README says {gb} GB, measured {m['peak_rss_bytes'] / 1e9:.2f} GB"
        assert int(learner) == m["learner_minutes_estimate"], f"{stem}: learner time {learner} vs estimate"


@pytest.mark.parametrize("path", notebooks(), ids=lambda p: p.stem)
def test_each_header_quotes_the_measured_minutes_and_memory(path):
    measured = json.loads((ROOT / "data" / "results" / "runtimes.json").read_text())["notebooks"][path.stem]
    nb = json.loads(path.read_text(encoding="utf-8"))
    head = "".join("".join(c["source"]) for c in nb["cells"][:2] if c["cell_type"] == "markdown")
    m = HEADER.search(head)
    assert m, f"{path.name}: the header needs '**Run All on a 2-core CPU:** N minutes, peak X GB of RAM'"
    assert m.group(1) == runtimes.run_all_minutes(measured["run_all_seconds"]), path.name
    assert m.group(2) == runtimes.peak_gb(measured["peak_rss_bytes"]), path.name


OUTSIDE = re.compile(r"\.\./shared|\bshared/(?:ANCHORS|FINDINGS|CONVENTIONS|hooks|tools)|\bshared/\w+\.md"
                     r"|\b[Ii]ssues? #?\d+\b")


def _lab_texts():
    for p in sorted(ROOT.glob("notebooks/**/*.ipynb")):
        nb = json.loads(p.read_text(encoding="utf-8"))
        for i, c in enumerate(nb["cells"]):
            yield f"{p.relative_to(ROOT)} cell {i}", "".join(c["source"])
    for p in [ROOT / "README.md", *sorted(ROOT.glob("docs/*.md")), *sorted(ROOT.glob("labkit/**/*.py"))]:
        yield str(p.relative_to(ROOT)), p.read_text(encoding="utf-8")


def test_nothing_points_outside_the_repository():
    """Learners have only the repository: no links to the developers' notes, no 'issue N' from the tracker."""
    bad = [(where, m.group(0)) for where, text in _lab_texts() for m in OUTSIDE.finditer(text)]
    assert bad == [], f"references to files or trackers a learner does not have: {bad[:10]}"


def test_the_outside_reference_pattern():
    for s in ("see ../shared/ANCHORS.md", "in shared/FINDINGS.md", "the budgets issue 7 asks about", "Issue #12"):
        assert OUTSIDE.search(s), s
    for s in ("a shared block", "shared by all 4", "tissue 3", "the prefix is shared/copied"):
        assert not OUTSIDE.search(s), s
