"""Notebook hygiene: strip metadata noise, and make student copies with the solutions taken out.

Used by `python -m labkit clean` and `python -m labkit student` (see README, "For developers").
Exercises use nbgrader's conventions, so the same solved notebook is also an nbgrader source notebook
(`python -m labkit.teach course`, docs/teaching.md):

- code between `### BEGIN SOLUTION` and `### END SOLUTION` lines (same indent; `# BEGIN SOLUTION` also works)
  becomes the stub below; a solution cell without markers (nbgrader metadata `solution: true`) becomes the stub;
- lines between `### BEGIN HIDDEN TESTS` and `### END HIDDEN TESTS` in a test cell are removed;
- a written answer (a markdown cell with `solution: true`) becomes "YOUR ANSWER HERE" (between markers, or whole).

    # YOUR CODE HERE
    raise NotImplementedError("Exercise: write your solution here")

nbgrader's `generate_assignment`, configured with this stub (labkit.teach), writes the same cells; a test checks it.
"""
from __future__ import annotations

import copy
import hashlib
import re
from pathlib import Path

import nbformat

BEGIN, END = "### BEGIN SOLUTION", "### END SOLUTION"
HIDDEN_BEGIN, HIDDEN_END = "### BEGIN HIDDEN TESTS", "### END HIDDEN TESTS"
STUB = ("# YOUR CODE HERE", 'raise NotImplementedError("Exercise: write your solution here")')
TEXT_STUB = "YOUR ANSWER HERE"  # nbgrader's stub for a written answer
NOTEBOOK_GLOB = "[0-9][0-9]_*.ipynb"
# one or three '#' (nbgrader writes three); '## BEGIN SOLUTION' is a markdown heading, not a marker
_MARKER = re.compile(r"^(?P<indent>[ \t]*)(?:###|#)[ \t]*(?P<kind>BEGIN|END) SOLUTION[ \t\r]*$")
_HIDDEN = re.compile(r"^(?P<indent>[ \t]*)(?:###|#)[ \t]*(?P<kind>BEGIN|END) HIDDEN TESTS[ \t\r]*$")
NBGRADER_KEYS = ("grade", "grade_id", "locked", "points", "schema_version", "solution", "task")
KERNELSPEC = {"display_name": "Python 3 (ipykernel)", "language": "python", "name": "python3"}


class SolutionMarkerError(ValueError):
    """Markers that do not pair up: nested, unclosed, unopened or at different indents."""


def has_marker(source: str) -> bool:
    """True if any line of `source` is a solution marker (any indent)."""
    return any(_MARKER.match(line) for line in source.split("\n"))


def solution_blocks(source: str) -> list[str]:
    """The non-empty code between each pair of solution markers (markers excluded), in order."""
    blocks, current = [], None
    for line in source.split("\n"):
        if _MARKER.match(line):
            if current is None:
                current = []
            else:
                blocks.append("\n".join(current))
                current = None
        elif current is not None:
            current.append(line)
    return [b for b in blocks if b.strip()]


def has_hidden_tests(source: str) -> bool:
    """True if any line of `source` is a hidden-tests marker (any indent)."""
    return any(_HIDDEN.match(line) for line in source.split("\n"))


def _replace_blocks(source: str, marker: re.Pattern, stub: tuple[str, ...], begin: str, end: str,
                    what: str) -> tuple[str, bool]:
    """Replace each `begin` … `end` block by `stub` at the markers' indent: (new source, any block found)."""
    out: list[str] = []
    open_at: tuple[int, str] | None = None  # (line number, indent) of the open BEGIN
    found = False
    for i, line in enumerate(source.split("\n"), start=1):
        m = marker.match(line)
        if m is None:
            if open_at is None:
                out.append(line)
            continue
        indent, kind = m["indent"], m["kind"]
        if kind == "BEGIN":
            if open_at is not None:
                raise SolutionMarkerError(f"line {i}: `{begin}` inside the block opened on line {open_at[0]}"
                                          f" (nested {what} are not allowed); close it with `{end}` first")
            open_at, found = (i, indent), True
        else:
            if open_at is None:
                raise SolutionMarkerError(f"line {i}: `{end}` without a `{begin}` before it")
            if indent != open_at[1]:
                raise SolutionMarkerError(f"line {i}: `{end}` is indented {indent!r} but its `{begin}` on line "
                                          f"{open_at[0]} is indented {open_at[1]!r}; put both at the same indent")
            out.extend(indent + s for s in stub)
            open_at = None
    if open_at is not None:
        raise SolutionMarkerError(f"line {open_at[0]}: `{begin}` is never closed; add `{end}` at the same indent")
    return "\n".join(out), found


def strip_solutions(source: str) -> str:
    """Replace each `### BEGIN SOLUTION` … `### END SOLUTION` block by the stub, at the markers' indent.

    Everything outside the blocks is kept byte for byte. Raises SolutionMarkerError (a ValueError) on
    nested, unclosed or unopened markers, or when BEGIN and END are at different indents.
    """
    return _replace_blocks(source, _MARKER, STUB, BEGIN, END, "solutions")[0]


def strip_hidden_tests(source: str) -> str:
    """Remove each `### BEGIN HIDDEN TESTS` … `### END HIDDEN TESTS` block, markers included."""
    return _replace_blocks(source, _HIDDEN, (), HIDDEN_BEGIN, HIDDEN_END, "hidden tests")[0]


def nbgrader_meta(cell) -> dict:
    """The cell's nbgrader metadata ({} for an ordinary cell)."""
    meta = cell.get("metadata", {}).get("nbgrader")
    return dict(meta) if isinstance(meta, dict) else {}


def student_source(cell) -> str:
    """The source a student sees for one cell (nbgrader's generate_assignment rules, see the module docstring)."""
    source, meta = _text(cell.get("source", "")), nbgrader_meta(cell)
    if cell.get("cell_type") == "markdown":
        if not meta.get("solution"):
            return source
        text, found = _replace_blocks(source, _MARKER, (TEXT_STUB,), BEGIN, END, "solutions")
        return text if found else TEXT_STUB
    if cell.get("cell_type") != "code":
        return source
    code, found = _replace_blocks(source, _MARKER, STUB, BEGIN, END, "solutions")
    if meta.get("solution") and not found:
        code = "\n".join(STUB)
    return strip_hidden_tests(code)


WIDGET_STATE = "application/vnd.jupyter.widget-state+json"


def clean_notebook(nb):
    """Return a copy of `nb` without metadata noise; outputs and execution counts are kept.

    Cell metadata keeps only `tags` and nbgrader's grading fields (`nbgrader`: grade_id, points, solution, grade,
    locked, task); notebook metadata keeps only the saved widget state, the kernelspec is normalised to python3
    and language_info to the language name (no interpreter version).
    """
    nb = copy.deepcopy(nb)
    meta = nb.setdefault("metadata", {})
    widgets = meta.pop("widgets", None)
    state = (widgets or {}).get(WIDGET_STATE)
    if state and state.get("state"):  # saved widget state lets a notebook show its widgets without a kernel
        meta["widgets"] = {WIDGET_STATE: state}
    meta["kernelspec"] = dict(KERNELSPEC)
    if "language_info" in meta:
        meta["language_info"] = {"name": "python"}
    needs_ids = (nb.get("nbformat", 4), nb.get("nbformat_minor", 0)) >= (4, 5)
    for index, cell in enumerate(nb.get("cells", [])):
        tags = cell.get("metadata", {}).get("tags")
        grading = {k: v for k, v in nbgrader_meta(cell).items() if k in NBGRADER_KEYS}
        cell["metadata"] = nbformat.NotebookNode({"tags": tags} if tags else {})
        if grading:
            cell["metadata"]["nbgrader"] = nbformat.NotebookNode(grading)
        if needs_ids and not cell.get("id"):  # a fixed id, not nbformat's random one
            cell["id"] = hashlib.sha1(f"{index}:{_text(cell.get('source', ''))}".encode()).hexdigest()[:8]
    return nb


def _text(source) -> str:
    return "".join(source) if isinstance(source, list) else source


def read_notebook(path):
    """Read a notebook as stored (no random cell ids added, unlike nbformat.read).

    A missing path is a FileNotFoundError, a file that is not a notebook a ValueError, each naming the path."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no notebook at {path}" + (" (it is a folder; name the .ipynb files)"
                                                            if path.is_dir() else "; check the path"))
    try:
        nb = nbformat.v4.nbjson.JSONReader().reads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not a Jupyter notebook (not notebook JSON: {e}); name an .ipynb file") from None
    if not isinstance(nb, dict) or not isinstance(nb.get("cells"), list):
        raise ValueError(f"{path} is JSON but not a Jupyter notebook (no list of cells); name an .ipynb file")
    return nb


def student_notebook(nb, name: str = "notebook"):
    """Return the student copy of `nb`: cleaned, solutions stubbed, hidden tests removed, outputs cleared."""
    nb = clean_notebook(nb)
    for index, cell in enumerate(nb.get("cells", [])):
        if cell.get("cell_type") not in ("code", "markdown"):
            continue
        try:
            cell["source"] = student_source(cell)
        except SolutionMarkerError as e:
            raise SolutionMarkerError(f"{name}, cell {index} (id {cell.get('id', '?')}): {e}") from None
        if cell.get("cell_type") == "code":
            cell["outputs"] = []
            cell["execution_count"] = None
    return nb


def notebook_text(nb) -> str:
    """The exact text a notebook is written as (nbformat's layout plus a final newline)."""
    text = nbformat.writes(nb)
    return text if text.endswith("\n") else text + "\n"


def _expected_copies(src_dir: Path) -> dict[str, str]:
    expected = {}
    for path in sorted(Path(src_dir).glob(NOTEBOOK_GLOB)):
        nb = read_notebook(path)
        expected[path.name] = notebook_text(student_notebook(nb, name=str(path)))
    return expected


def write_student_copies(src_dir, out_dir) -> list[Path]:
    """Write the student copy of every NN_*.ipynb in src_dir into out_dir (same names); return the
    paths written. Copies in out_dir whose solved notebook is gone are removed."""
    src_dir, out_dir = Path(src_dir), Path(out_dir)
    expected = _expected_copies(src_dir)  # all of them first: a marker error writes nothing
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name, text in expected.items():
        path = out_dir / name
        if not path.exists() or path.read_text(encoding="utf-8") != text:
            tmp = path.with_name(f".{name}.tmp")
            tmp.write_text(text, encoding="utf-8")
            tmp.replace(path)
        written.append(path)
    for path in out_dir.glob(NOTEBOOK_GLOB):
        if path.name not in expected:
            path.unlink()
    return written


def student_copy_problems(src_dir, out_dir) -> list[tuple[Path, str]]:
    """[(path, why)] for every student copy that is missing, stale, orphaned or still has a marker."""
    src_dir, out_dir = Path(src_dir), Path(out_dir)
    expected = _expected_copies(src_dir)
    problems = []
    for name, text in expected.items():
        path = out_dir / name
        if not path.exists():
            problems.append((path, "missing"))
        elif path.read_text(encoding="utf-8") != text:
            problems.append((path, "stale"))
    for path in sorted(out_dir.glob(NOTEBOOK_GLOB)) if out_dir.is_dir() else []:
        if path.name not in expected:
            problems.append((path, f"no solved notebook {src_dir / path.name}"))
        else:
            nb = read_notebook(path)
            codes = [_text(c.get("source", "")) for c in nb.cells if c.get("cell_type") == "code"]
            if any(has_marker(src) for src in codes):
                problems.append((path, "still contains a solution marker"))
            if any(has_hidden_tests(src) for src in codes):
                problems.append((path, "still contains hidden tests"))
    return problems


def check_student_copies(src_dir, out_dir) -> list[Path]:
    """Paths of student copies that are missing, stale, orphaned or still contain a solution ([] = current)."""
    return list(dict.fromkeys(path for path, _ in student_copy_problems(src_dir, out_dir)))
