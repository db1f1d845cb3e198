"""The classroom side (labkit.teach): every notebook's exercises in nbgrader's format, the course folder, the
points table and the JupyterHub memory limit. Fast; nbgrader itself runs in tests/test_grading.py."""
from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest

from labkit import student, teach

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob(student.NOTEBOOK_GLOB))


def _exercise_cells(nb):
    cells = nb.cells
    start = next(i for i, c in enumerate(cells) if student.nbgrader_meta(c))
    return cells[start:]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_exercises_are_graded_by_nbgrader(path):
    nb = student.read_notebook(path)
    graded = [c for c in nb.cells if student.nbgrader_meta(c)]
    assert graded, f"{path.name}: no nbgrader cells; the exercises need nbgrader metadata (docs/teaching.md)"
    ids = [student.nbgrader_meta(c)["grade_id"] for c in graded]
    assert len(ids) == len(set(ids)), f"{path.name}: grade_id used twice: {ids}"
    section = _exercise_cells(nb)
    first = student.nbgrader_meta(section[0])
    assert section[0].cell_type == "code" and first.get("locked") and not first.get("grade") \
        and not first.get("solution"), f"{path.name}: the exercises start with a read-only setup cell"
    assert all(student.nbgrader_meta(c) for c in section if c.cell_type == "code"), \
        f"{path.name}: every code cell of the exercise section is graded or read-only (the grader runs only those)"
    points = teach.exercise_points(nb)
    tests = {g: p for g, p in points.items() if p["kind"] == "auto"}
    answers = {g: p for g, p in points.items() if p["kind"] == "manual"}
    assert len(tests) >= 3 and all(p["points"] > 0 for p in points.values()), f"{path.name}: {points}"
    assert answers, f"{path.name}: no written answer ('explain why', graded by hand)"
    hidden = [c for c in section if c.cell_type == "code" and student.has_hidden_tests(c.source)]
    assert hidden and all(student.nbgrader_meta(c).get("grade") for c in hidden), \
        f"{path.name}: hidden tests belong in test cells, and every notebook has some"
    for cell in nb.cells:
        if cell.cell_type == "code" and student.has_marker(cell.source):
            assert student.nbgrader_meta(cell).get("solution"), f"{path.name}: a solution outside a solution cell"


def _root(node) -> str:
    while isinstance(node, (ast.Attribute, ast.Call, ast.Subscript)):
        node = node.func if isinstance(node, ast.Call) else node.value
    return node.id if isinstance(node, ast.Name) else ""


def _statements(block: str) -> list[ast.stmt]:
    """The statements of a solution block (dedented; a block with `return` is read as a function body)."""
    lines = [line for line in block.split("\n") if line.strip() and not line.strip().startswith("#")]
    indent = min((len(line) - len(line.lstrip()) for line in lines), default=0)
    body = "\n".join("    " + line[indent:] for line in lines)
    return ast.parse("def _solution():\n" + (body or "    pass")).body[0].body


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_no_solution_is_a_single_labkit_call(path):
    for cell in student.read_notebook(path).cells:
        if cell.cell_type != "code" or not student.nbgrader_meta(cell).get("solution"):
            continue
        for block in student.solution_blocks(cell.source):
            body = _statements(block)
            one_call = len(body) == 1 and any(isinstance(n, ast.Call) and _root(n.func) in ("lk", "labkit")
                                              for n in ast.walk(body[0]))
            assert not one_call, f"{path.name}: a solution that is one call into labkit:\n{block}"


def test_the_single_call_check_on_fixtures():
    assert _root(ast.parse("lk.memory.f(x)['total'] / 2").body[0].value.left.value.func) == "lk"
    old = "    return lk.memory.estimate_training_bytes(n, 'mixed', 'adam')['total'] / 1e9"
    body = _statements(old)
    assert len(body) == 1 and any(isinstance(n, ast.Call) and _root(n.func) == "lk" for n in ast.walk(body[0]))
    assert len(_statements("    x = 1\n    return lk.f(x)")) == 2


def test_graded_cell_selects_setup_solution_and_test_cells():
    def cell(**meta):
        return {"cell_type": "code", "source": "", "metadata": {"nbgrader": meta} if meta else {}}
    assert teach.graded_cell(cell(locked=True)) and teach.graded_cell(cell(solution=True))
    assert teach.graded_cell(cell(grade=True, locked=True, points=2))
    assert not teach.graded_cell(cell()) and not teach.graded_cell(cell(locked=False, solution=False, grade=False))


def test_make_course_writes_the_config_and_one_assignment_per_notebook(tmp_path):
    written = teach.make_course(tmp_path)
    assert [p.relative_to(tmp_path).as_posix() for p in written] == \
        [f"source/{p.stem}/{p.name}" for p in NOTEBOOKS]
    config = (tmp_path / "nbgrader_config.py").read_text()
    compile(config, "nbgrader_config.py", "exec")
    assert "labkit.teach.ExerciseExecute" in config and repr("\n".join(student.STUB)) in config
    nb = student.read_notebook(written[0])
    assert [c.source for c in nb.cells] == [c.source for c in student.read_notebook(NOTEBOOKS[0]).cells]
    with pytest.raises(FileExistsError, match="force"):
        teach.make_course(tmp_path)
    assert teach.make_course(tmp_path / "one", names=["03"]) == \
        [tmp_path / "one" / "source" / NOTEBOOKS[3].stem / NOTEBOOKS[3].name]
    with pytest.raises(ValueError, match="no notebook"):
        teach.make_course(tmp_path / "two", names=["99"])


def test_hub_memory_is_the_largest_peak_plus_the_server_rounded_up(tmp_path):
    runtimes = tmp_path / "runtimes.json"
    runtimes.write_text(json.dumps({"notebooks": {"a": {"peak_rss_bytes": 1_200_000_000, "run_all_seconds": 60},
                                                  "b": {"peak_rss_bytes": 2_100_000_000, "run_all_seconds": 30}}}))
    hub = teach.hub_memory(runtimes)
    assert hub["largest"] == "b" and hub["limit_bytes"] == 3_000_000_000   # 2.1 + 0.5 → 3.0 GB
    measured = json.loads(teach.RUNTIMES.read_text())["notebooks"]
    real = teach.hub_memory()
    assert real["limit_bytes"] >= max(r["peak_rss_bytes"] for r in measured.values()) + teach.SERVER_BYTES


def test_teach_command_line(capsys, tmp_path):
    from labkit.__main__ import main
    assert main(["teach", "hub", "--users", "200"]) == 0
    assert "c.Spawner.mem_limit = '" in capsys.readouterr().out
    assert main(["teach", "points"]) == 0
    out = capsys.readouterr().out
    assert all(p.stem in out for p in NOTEBOOKS) and "total" in out
    assert main(["teach", "course", str(tmp_path), "00"]) == 0
    assert main(["teach", "course", str(tmp_path), "00"]) == 2   # exists: --force to replace
    assert "--force" in capsys.readouterr().err


def test_forbid_calls_catches_a_call_however_it_was_imported():
    import labkit as lk
    from labkit.prune import magnitude_mask as renamed
    import torch
    w = torch.randn(4, 4)
    with lk.checks.forbid_calls(lk.prune.magnitude_mask):
        (w.abs() > 0.5).sum()
    with pytest.raises(AssertionError, match=r"labkit\.(prune|masks)\.magnitude_mask"):
        with lk.checks.forbid_calls(lk.prune.magnitude_mask):
            renamed(w, 0.5)
    with pytest.raises(TypeError, match="Python functions"):
        with lk.checks.forbid_calls(len):
            pass
    q = lk.quantize.quantize(w, 4, group_size=4)
    with pytest.raises(AssertionError, match="nbytes"):  # a property: its getter is watched
        with lk.checks.forbid_calls(lk.quantize.QTensor.nbytes):
            q.nbytes
    import sys
    assert sys.getprofile() is None, "the profiler is put back"
