"""Teaching with the lab: an nbgrader course made from the notebooks, graded by running only the exercises,
and the memory a JupyterHub needs per user. The instructor's guide is docs/teaching.md.

    python -m labkit teach course ~/course    # nbgrader_config.py + source/NN_name/NN_name.ipynb per notebook
    python -m labkit teach points             # the points of every notebook's exercises
    python -m labkit teach hub                # a per-user memory limit from the measured peaks

Every notebook ends with a self-contained exercise section in nbgrader's format: a read-only setup cell, solution
cells, test cells with points (some with hidden tests) and written answers. The course's nbgrader_config.py makes
`nbgrader autograde` run only the cells that carry nbgrader metadata (ExerciseExecute), so grading one submission
takes seconds instead of the lesson's Run All minutes; a solution that needs a variable from the lesson fails,
which is why each exercise section imports and builds what it uses. nbgrader is the optional `teach` extra
(`pip install -e ".[teach]"`); only ExerciseExecute needs it.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from . import student as _student
from .repro import REPO_ROOT

NOTEBOOKS = REPO_ROOT / "notebooks"
RUNTIMES = REPO_ROOT / "data" / "results" / "runtimes.json"
COURSE_ID = "llm-memory-lab"
SERVER_BYTES = 0.5e9     # jupyter-server, the terminal and the browser-side state of one user, besides a kernel
HUB_STEP_BYTES = 0.5e9   # memory limits are given in steps of 0.5 GB

NBGRADER_CONFIG = '''\
# nbgrader configuration for the LLM Memory Lab, written by `python -m labkit teach course` (docs/teaching.md).
from nbgrader.converters import Autograde
from nbgrader.preprocessors import Execute

c = get_config()  # noqa: F821 (nbgrader provides it)
c.CourseDirectory.course_id = {course_id!r}

# The same stub as the lab's student copies (notebooks/student/), so a release is that copy.
c.ClearSolutions.code_stub = {{"python": {stub!r}}}

# Grade by running only the cells that carry nbgrader metadata (read-only setup, solutions, tests): the
# exercise sections are self-contained, and the lesson's cells (minutes of CPU) are not run again.
c.Autograde.autograde_preprocessors = [
    "labkit.teach.ExerciseExecute" if p is Execute else p for p in Autograde.autograde_preprocessors.default()]
c.Execute.timeout = 120   # seconds per cell
'''


def graded_cell(cell) -> bool:
    """True for the cells nbgrader grading needs: read-only (locked), solution and test (grade) cells."""
    meta = _student.nbgrader_meta(cell)
    return bool(meta.get("locked") or meta.get("solution") or meta.get("grade"))


def _exercise_execute():
    from nbgrader.preprocessors import Execute

    class ExerciseExecute(Execute):
        """nbgrader's Execute preprocessor, running only the code cells `graded_cell` selects (the rest keep
        no outputs): a notebook's exercises are graded without running its lesson again."""

        def preprocess_cell(self, cell, resources, index):
            if cell.get("cell_type") == "code" and not graded_cell(cell):
                return cell, resources
            return super().preprocess_cell(cell, resources, index)

    ExerciseExecute.__module__ = __name__
    return ExerciseExecute


def __getattr__(name: str):
    if name == "ExerciseExecute":   # built on first use, so that labkit.teach imports without nbgrader
        cls = globals()[name] = _exercise_execute()
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def nbgrader_config(course_id: str = COURSE_ID) -> str:
    """The text of the course's nbgrader_config.py."""
    return NBGRADER_CONFIG.format(course_id=course_id, stub="\n".join(_student.STUB))


def notebook_paths(src=NOTEBOOKS) -> list[Path]:
    return sorted(Path(src).glob(_student.NOTEBOOK_GLOB))


def make_course(dest, src=NOTEBOOKS, names=None, force: bool = False) -> list[Path]:
    """Write an nbgrader course folder: `dest/nbgrader_config.py` and one assignment per notebook,
    `dest/source/NN_name/NN_name.ipynb` (the solved notebook, cleaned). `names` picks notebooks by stem or
    number ("03"); an existing source notebook is replaced only with force=True. Returns the notebooks written."""
    dest = Path(dest)
    paths = notebook_paths(src)
    if names:
        wanted = {str(n) for n in names}
        picked = [p for p in paths if p.stem in wanted or p.stem[:2] in wanted]
        unknown = wanted - {p.stem for p in picked} - {p.stem[:2] for p in picked}
        if unknown:
            raise ValueError(f"no notebook {sorted(unknown)} in {src}; choose from {[p.stem for p in paths]}")
        paths = picked
    if not paths:
        raise ValueError(f"no NN_*.ipynb notebooks in {src}")
    targets = [dest / "source" / p.stem / p.name for p in paths]
    existing = [t for t in targets if t.exists()]
    if existing and not force:
        raise FileExistsError(f"{existing[0]} exists; pass force=True (--force) to replace the source notebooks")
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "nbgrader_config.py").write_text(nbgrader_config(), encoding="utf-8")
    for path, target in zip(paths, targets):
        target.parent.mkdir(parents=True, exist_ok=True)
        nb = _student.clean_notebook(_student.read_notebook(path))
        target.write_text(_student.notebook_text(nb), encoding="utf-8")
    return targets


def exercise_points(nb) -> dict[str, dict]:
    """{grade_id: {"points", "kind"}} of a notebook's graded cells; kind "auto" (a test cell) or "manual"
    (a written answer graded by hand)."""
    out = {}
    for cell in nb.get("cells", []):
        meta = _student.nbgrader_meta(cell)
        if meta.get("grade"):
            manual = bool(meta.get("solution")) or cell.get("cell_type") == "markdown"
            out[meta["grade_id"]] = {"points": float(meta.get("points", 0)), "kind": "manual" if manual else "auto"}
    return out


def points_table(src=NOTEBOOKS) -> dict[str, dict]:
    """Per notebook: auto and manual points and the number of graded cells."""
    table = {}
    for path in notebook_paths(src):
        pts = exercise_points(_student.read_notebook(path))
        table[path.stem] = {kind: sum(p["points"] for p in pts.values() if p["kind"] == kind)
                            for kind in ("auto", "manual")} | {"cells": len(pts)}
    return table


def hub_memory(runtimes=RUNTIMES) -> dict:
    """A JupyterHub per-user memory limit from the measured kernel peaks (data/results/runtimes.json): the
    largest notebook's peak plus the user's server, rounded up to 0.5 GB (one kernel running at a time)."""
    measured = json.loads(Path(runtimes).read_text(encoding="utf-8"))["notebooks"]
    peaks = {name: int(r["peak_rss_bytes"]) for name, r in measured.items() if r.get("peak_rss_bytes")}
    if not peaks:
        raise ValueError(f"{runtimes} has no peak_rss_bytes; run `python -m labkit results runtimes`")
    worst = max(peaks, key=peaks.get)
    limit = math.ceil((peaks[worst] + SERVER_BYTES) / HUB_STEP_BYTES) * HUB_STEP_BYTES
    return {"peaks": peaks, "largest": worst, "limit_bytes": int(limit),
            "run_all_seconds": {name: r["run_all_seconds"] for name, r in measured.items()}}


# --- command line --------------------------------------------------------------------------------

def _gb(n: float) -> str:
    return f"{n / 1e9:.1f} GB"


def cmd_course(args) -> int:
    try:
        written = make_course(args.dest, names=args.notebooks, force=args.force)
    except (ValueError, FileExistsError) as e:
        print(f"teach course: {e}", file=sys.stderr)
        return 2
    print(f"wrote {Path(args.dest) / 'nbgrader_config.py'} and {len(written)} assignments:")
    for path in written:
        print(f"  {path}")
    print(f"next: cd {args.dest} && nbgrader generate_assignment '*'   (docs/teaching.md)")
    return 0


def cmd_points(args) -> int:
    table = points_table()
    print(f"{'notebook':24s} {'auto':>5s} {'manual':>7s} {'graded cells':>13s}")
    for name, row in table.items():
        print(f"{name:24s} {row['auto']:5g} {row['manual']:7g} {row['cells']:13d}")
    total = {k: sum(r[k] for r in table.values()) for k in ("auto", "manual")}
    print(f"{'total':24s} {total['auto']:5g} {total['manual']:7g}")
    return 0


def cmd_hub(args) -> int:
    try:
        hub = hub_memory()
    except (OSError, ValueError, KeyError) as e:
        print(f"teach hub: {e}", file=sys.stderr)
        return 2
    for name, peak in hub["peaks"].items():
        print(f"{name:24s} kernel peak {_gb(peak):>7s}   Run All {hub['run_all_seconds'][name] / 60:4.1f} min")
    gb = hub["limit_bytes"] / 1e9
    print(f"largest: {hub['largest']} ({_gb(hub['peaks'][hub['largest']])}) + {_gb(SERVER_BYTES)} for the server")
    print(f"JupyterHub, per user (one kernel at a time): c.Spawner.mem_limit = '{gb:g}G'")
    if args.users:
        print(f"{args.users} users all at their peak at once: {args.users * gb:,.0f} GB of RAM across the nodes")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m labkit teach", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("course", help="write an nbgrader course folder (one assignment per notebook)")
    c.add_argument("dest", help="the course folder (nbgrader's root)")
    c.add_argument("notebooks", nargs="*", help="notebook numbers or names (default: all)")
    c.add_argument("--force", action="store_true", help="replace source notebooks already there")
    c.set_defaults(fn=cmd_course)
    sub.add_parser("points", help="print the points per notebook").set_defaults(fn=cmd_points)
    h = sub.add_parser("hub", help="print a JupyterHub per-user memory limit from the measured peaks")
    h.add_argument("--users", type=int, default=0, help="class size, for the total")
    h.set_defaults(fn=cmd_hub)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
