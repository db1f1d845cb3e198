"""nbgrader grades the lab: the real `nbgrader generate_assignment` and `nbgrader autograde` (the CLI, in a course
folder written by `python -m labkit teach course`) on all eight notebooks, for three submissions each:

(a) the solved notebooks → every autograded point, written answers waiting for a human, no error anywhere;
(b) nbgrader's student release → 0 autograded points and no error outside the answer and test cells;
(c) the solutions with one known wrong answer per notebook → exactly that test cell's points lost.

nbgrader's release must equal the committed student copy (notebooks/student/) cell for cell. Grading runs only
the exercise cells (labkit.teach.ExerciseExecute, set in the course's nbgrader_config.py), so the whole test takes
about a minute instead of the notebooks' Run All time; the three submissions are graded in parallel, each in its
own copy of the course. Skipped when nbgrader (the `teach` extra) is not installed.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from labkit import student, teach

pytest.importorskip("nbgrader", reason="nbgrader is the optional `teach` extra: pip install -e '.[teach]'")

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob(student.NOTEBOOK_GLOB))

# One known wrong answer per notebook: (solution cell, text replaced, replacement, the test cell that must fail).
# Most pass the visible checks (a call to labkit's reference, or a wrong decision); the hidden tests catch them.
WRONG = {
    "00_where_memory_goes": ("ex1_solution", "return 2 * config.num_hidden_layers * config.num_key_value_heads * "
                             "config.head_dim * bytes_per_value",
                             "return lk.memory.kv_bytes_per_token(config, torch.bfloat16) * bytes_per_value // 2",
                             "ex1_test"),
    "01_pruning": ("ex1_solution", "    k = round(sparsity * w.numel())\n",
                   "    return lk.prune.magnitude_mask(w, sparsity)\n", "ex1_test"),
    "02_quantization": ("ex1_solution", "    qmax = 2 ** (bits - 1) - 1\n",
                        "    return Q.dequantize(Q.quantize(x, bits, group_size=group_size, scale_dtype=torch.float32))\n",
                        "ex1_test"),
    "03_distillation": ("ex3_solution", "(ev[\"test_ppl\"], i, j)", "(ev[\"val_ppl\"], i, j)", "ex3_test"),
    "04_sparse_storage": ("ex3_solution", "    keep = lk.compress",
                          "    return lk.sparse.Bitmap(mask_bytes, values, tuple(shape)).to_dense()\n    keep = lk.compress",
                          "ex3_test"),
    "05_memory_pools": ("ex3_solution", "return max(ok) if ok else None", "return min(ok) if ok else None", "ex3_test"),
    "06_other_designs": ("ex3_solution", "    for ranks in range(1, max_ranks + 1):\n        for stage in range(4):",
                         "    for stage in range(4):\n        for ranks in range(1, max_ranks + 1):", "ex3_test"),
    "07_capstone": ("ex3_solution", "max(r[\"load_peak_rss_bytes\"], r[\"steady_rss_bytes\"])",
                    "r[\"steady_rss_bytes\"]", "ex3_test"),
}
STUDENTS = ("solutions", "release", "wrong")


def _nbgrader(course: Path, *args: str) -> str:
    env = dict(os.environ, PATH=str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", ""))
    proc = subprocess.run([sys.executable, "-m", "nbgrader", *args], cwd=course, env=env, capture_output=True,
                          text=True, timeout=900)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"nbgrader {' '.join(args)} failed (exit {proc.returncode}):\n{out[-4000:]}"
    return out


def _wrong(nb, name: str):
    cell_id, old, new, _ = WRONG[name]
    cells = [c for c in nb.cells if student.nbgrader_meta(c).get("grade_id") == cell_id]
    assert len(cells) == 1 and old in cells[0].source, f"{name}: the wrong answer's text is not in {cell_id}"
    cells[0].source = cells[0].source.replace(old, new)
    return nb


def _grades(course: Path, who: str) -> dict:
    from nbgrader.api import Gradebook
    out = {}
    with Gradebook(f"sqlite:///{course / 'gradebook.db'}") as gb:
        for path in NOTEBOOKS:
            nb = gb.find_submission_notebook(path.stem, path.stem, who)
            out[path.stem] = {g.name: (g.auto_score, g.max_score, g.needs_manual_grade) for g in nb.grades}
    return out


def _kind(cell) -> str:
    meta = student.nbgrader_meta(cell)
    return "test" if meta.get("grade") else "answer" if meta.get("solution") else "setup" if meta.get("locked") \
        else "lesson"


def _errors(course: Path, who: str) -> dict:
    """{notebook: [(kind, grade_id, ename)]}: the error outputs of the autograded notebooks, by kind of cell
    (setup, answer, test), and every lesson cell that was executed (none may be: grading runs the exercises)."""
    out = {}
    for path in NOTEBOOKS:
        nb = student.read_notebook(course / "autograded" / who / path.stem / path.name)
        errs = []
        for cell in nb.cells:
            if cell.cell_type != "code":
                continue
            kind, gid = _kind(cell), student.nbgrader_meta(cell).get("grade_id")
            errs += [(kind, gid, o.get("ename")) for o in cell.get("outputs", []) if o.get("output_type") == "error"]
            if kind == "lesson" and (cell.get("outputs") or cell.get("execution_count")):
                errs.append((kind, cell.get("id"), "executed"))
        out[path.stem] = errs
    return out


@pytest.fixture(scope="module")
def graded(tmp_path_factory):
    missing = [p.stem for p in NOTEBOOKS if not teach.exercise_points(student.read_notebook(p))]
    assert not missing, f"no nbgrader test cells in {missing}: every notebook's exercises need nbgrader metadata"
    assert sorted(WRONG) == [p.stem for p in NOTEBOOKS], "WRONG needs one wrong answer per notebook"
    t0 = time.perf_counter()
    base = tmp_path_factory.mktemp("course")
    teach.make_course(base)
    _nbgrader(base, "generate_assignment", "*")
    t_generate = time.perf_counter() - t0
    courses = {}
    for who in STUDENTS:  # one copy of the course (and of its gradebook) per submission, graded in parallel
        course = base.parent / f"course-{who}"
        shutil.copytree(base, course)
        for path in NOTEBOOKS:
            src = course / ("release" if who == "release" else "source") / path.stem / path.name
            nb = student.read_notebook(src)
            if who == "wrong":
                nb = _wrong(nb, path.stem)
            dest = course / "submitted" / who / path.stem / path.name
            dest.parent.mkdir(parents=True)
            dest.write_text(student.notebook_text(nb), encoding="utf-8")
        courses[who] = course
    with ThreadPoolExecutor(max_workers=min(len(STUDENTS), max(1, os.cpu_count() or 1))) as pool:
        logs = dict(zip(STUDENTS, pool.map(lambda w: _nbgrader(courses[w], "autograde", "*"), STUDENTS)))
    seconds = time.perf_counter() - t0
    print(f"\nnbgrader: generate_assignment {t_generate:.0f} s, all of it {seconds:.0f} s "
          f"({len(NOTEBOOKS)} notebooks × {len(STUDENTS)} submissions)")
    return {"base": base, "courses": courses, "logs": logs, "seconds": seconds,
            "grades": {w: _grades(courses[w], w) for w in STUDENTS},
            "errors": {w: _errors(courses[w], w) for w in STUDENTS}}


def test_release_is_the_committed_student_copy(graded):
    for path in NOTEBOOKS:
        release = student.read_notebook(graded["base"] / "release" / path.stem / path.name)
        ours = student.read_notebook(ROOT / "notebooks" / "student" / path.name)
        assert [(c.cell_type, c.source) for c in release.cells] == [(c.cell_type, c.source) for c in ours.cells], \
            f"{path.name}: nbgrader's release differs from notebooks/student/ (run `python -m labkit student`)"


def test_solutions_get_every_autograded_point(graded):
    for name, cells in graded["grades"]["solutions"].items():
        for gid, (score, most, manual) in cells.items():
            if manual:
                assert score is None, f"{name} {gid}: a written answer is graded by hand"
            else:
                assert score == most > 0, f"{name} {gid}: {score} of {most} points for the solution"
        assert any(not m for _, _, m in cells.values()), f"{name}: no autograded test"
        assert graded["errors"]["solutions"][name] == [], f"{name}: {graded['errors']['solutions'][name]}"


def test_student_release_gets_nothing_and_grades_cleanly(graded):
    for name, cells in graded["grades"]["release"].items():
        for gid, (score, most, manual) in cells.items():
            assert score == 0 and not manual, f"{name} {gid}: {score} points for the unanswered release"
        errors = graded["errors"]["release"][name]
        outside = [e for e in errors if e[0] not in ("answer", "test")]
        assert outside == [], f"{name}: errors outside answer and test cells (setup? lesson cells run?): {outside}"
        assert {e[2] for e in errors} <= {"NotImplementedError", "NameError"}, f"{name}: {errors}"


def test_one_wrong_answer_loses_exactly_that_test(graded):
    for name, cells in graded["grades"]["wrong"].items():
        failing = WRONG[name][3]
        lost = {gid: most - score for gid, (score, most, manual) in cells.items() if not manual and score != most}
        assert lost == {failing: cells[failing][1]}, f"{name}: points lost {lost}, expected only {failing}"
        others = [e for e in graded["errors"]["wrong"][name] if e[1] != failing]
        assert others == [], f"{name}: the wrong answer broke other cells too: {others}"


def test_points_per_notebook(graded):
    table = teach.points_table()
    for name, cells in graded["grades"]["solutions"].items():
        auto = sum(most for _, most, manual in cells.values() if not manual)
        assert auto == table[name]["auto"] > 0
        assert table[name]["manual"] > 0, f"{name}: no written answer"
