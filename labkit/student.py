"""Notebook hygiene: strip metadata noise, and make student copies with the solutions taken out.

Used by `python -m labkit clean` and `python -m labkit student` (see README, "For developers").
Exercise solutions sit between `# BEGIN SOLUTION` and `# END SOLUTION` lines (same indent) in code cells;
the student copy keeps everything else and puts a stub in their place:

    # YOUR CODE HERE
    raise NotImplementedError("Exercise: write your solution here")
"""
from __future__ import annotations

import copy
import hashlib
import re
from pathlib import Path

import nbformat

BEGIN, END = "# BEGIN SOLUTION", "# END SOLUTION"
STUB = ("# YOUR CODE HERE", 'raise NotImplementedError("Exercise: write your solution here")')
NOTEBOOK_GLOB = "[0-9][0-9]_*.ipynb"
_MARKER = re.compile(r"^(?P<indent>[ \t]*)#\s*(?P<kind>BEGIN|END) SOLUTION[ \t\r]*$")
KERNELSPEC = {"display_name": "Python 3 (ipykernel)", "language": "python", "name": "python3"}


class SolutionMarkerError(ValueError):
    """Markers that do not pair up: nested, unclosed, unopened or at different indents."""


def has_marker(source: str) -> bool:
    """True if any line of `source` is a solution marker (any indent)."""
    return any(_MARKER.match(line) for line in source.split("\n"))


def strip_solutions(source: str) -> str:
    """Replace each `# BEGIN SOLUTION` … `# END SOLUTION` block by the stub, at the markers' indent.

    Everything outside the blocks is kept byte for byte. Raises SolutionMarkerError (a ValueError) on
    nested, unclosed or unopened markers, or when BEGIN and END are at different indents.
    """
    out: list[str] = []
    open_at: tuple[int, str] | None = None  # (line number, indent) of the open BEGIN
    for i, line in enumerate(source.split("\n"), start=1):
        m = _MARKER.match(line)
        if m is None:
            if open_at is None:
                out.append(line)
            continue
        indent, kind = m["indent"], m["kind"]
        if kind == "BEGIN":
            if open_at is not None:
                raise SolutionMarkerError(f"line {i}: `{BEGIN}` inside the block opened on line {open_at[0]}"
                                          f" (nested solutions are not allowed); close it with `{END}` first")
            open_at = (i, indent)
        else:
            if open_at is None:
                raise SolutionMarkerError(f"line {i}: `{END}` without a `{BEGIN}` before it")
            if indent != open_at[1]:
                raise SolutionMarkerError(f"line {i}: `{END}` is indented {indent!r} but its `{BEGIN}` on line "
                                          f"{open_at[0]} is indented {open_at[1]!r}; put both at the same indent")
            out.extend(indent + s for s in STUB)
            open_at = None
    if open_at is not None:
        raise SolutionMarkerError(f"line {open_at[0]}: `{BEGIN}` is never closed; add `{END}` at the same indent")
    return "\n".join(out)


WIDGET_STATE = "application/vnd.jupyter.widget-state+json"


def clean_notebook(nb):
    """Return a copy of `nb` without metadata noise; outputs and execution counts are kept.

    Cell metadata keeps only `tags`; notebook metadata keeps only the saved widget state, the kernelspec is
    normalised to python3 and language_info to the language name (no interpreter version).
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
        cell["metadata"] = nbformat.NotebookNode({"tags": tags} if tags else {})
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
    """Return the student copy of `nb`: cleaned, solutions stubbed, all outputs and counts cleared."""
    nb = clean_notebook(nb)
    for index, cell in enumerate(nb.get("cells", [])):
        if cell.get("cell_type") != "code":
            continue
        try:
            cell["source"] = strip_solutions(_text(cell.get("source", "")))
        except SolutionMarkerError as e:
            raise SolutionMarkerError(f"{name}, cell {index} (id {cell.get('id', '?')}): {e}") from None
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
            if any(has_marker(_text(c.get("source", ""))) for c in nb.cells if c.get("cell_type") == "code"):
                problems.append((path, "still contains a solution marker"))
    return problems


def check_student_copies(src_dir, out_dir) -> list[Path]:
    """Paths of student copies that are missing, stale, orphaned or still contain a solution ([] = current)."""
    return list(dict.fromkeys(path for path, _ in student_copy_problems(src_dir, out_dir)))
