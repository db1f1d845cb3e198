"""The README's notebook table must list every notebook (with its minutes on a 2-core CPU) and nothing else."""
from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ROW = re.compile(r"^\|\s*\[(\d\d) · [^\]]+\]\((notebooks/\d\d_\w+\.ipynb)\)\s*\|([^|]+)\|\s*([^|]+?)\s*\|\s*$")


def table_rows(text: str) -> list[tuple[str, str, str, str]]:
    return [m.groups() for line in text.splitlines() if (m := ROW.match(line))]


def test_row_parser_on_a_small_example():
    text = "| notebook | you will learn | minutes |\n|---|---|---|\n" \
           "| [03 · Distillation](notebooks/03_distillation.ipynb) | a student learns | 1.5 |\n"
    assert table_rows(text) == [("03", "notebooks/03_distillation.ipynb", " a student learns ", "1.5")]


def test_readme_table_lists_exactly_the_notebooks_with_minutes():
    rows = table_rows((ROOT / "README.md").read_text(encoding="utf-8"))
    listed = [path for _, path, _, _ in rows]
    on_disk = sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
    assert listed == on_disk, "README's notebook table and notebooks/NN_*.ipynb differ: add or remove rows"
    for number, path, learn, minutes in rows:
        assert Path(path).name.startswith(number), f"row {number} links {path}"
        assert learn.strip(), f"row {number}: say what the learner will learn"
        assert re.fullmatch(r"(about )?\d+(\.\d+)?([–-]\d+(\.\d+)?)?", minutes), \
            f"row {number}: minutes on a 2-core CPU should be a number or a range, got {minutes!r}"
