"""Student copies: solution stripping (hand fixtures + hypothesis) and the committed copies being current."""
from __future__ import annotations

from pathlib import Path

import nbformat
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook, new_output

from labkit import student
from labkit.student import SolutionMarkerError, strip_solutions

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = ROOT / "notebooks"
STUB = 'raise NotImplementedError("Exercise: write your solution here")'


# --- hand fixtures ---------------------------------------------------------------------------------

def test_top_level_block_is_replaced_by_the_stub():
    src = "x = 1\n# BEGIN SOLUTION\ny = x + 1\n# END SOLUTION\nprint(y)"
    assert strip_solutions(src) == f"x = 1\n# YOUR CODE HERE\n{STUB}\nprint(y)"


def test_indented_block_keeps_its_indent():
    src = "def f(x):\n    # BEGIN SOLUTION\n    y = x * 2\n    return y\n    # END SOLUTION\n"
    assert strip_solutions(src) == f"def f(x):\n    # YOUR CODE HERE\n    {STUB}\n"


def test_two_blocks_and_code_between_them():
    src = "# BEGIN SOLUTION\na = 1\n# END SOLUTION\nb = 2\n# BEGIN SOLUTION\nc = 3\n# END SOLUTION"
    out = strip_solutions(src)
    assert out.count(STUB) == 2 and "b = 2" in out and "a = 1" not in out and "c = 3" not in out


def test_source_without_markers_is_unchanged():
    for src in ["", "\n", "x = 1", "x = 1\n", "# BEGIN SOLUTIONS are nice\n", "## BEGIN SOLUTION", "s = '# END'"]:
        assert strip_solutions(src) == src


@pytest.mark.parametrize("src, words", [
    ("# BEGIN SOLUTION\n# BEGIN SOLUTION\nx\n# END SOLUTION\n# END SOLUTION", "nested"),
    ("x = 1\n# END SOLUTION", "without"),
    ("# BEGIN SOLUTION\nx = 1", "never closed"),
    ("def f():\n    # BEGIN SOLUTION\n    pass\n# END SOLUTION", "same indent"),
])
def test_unbalanced_markers_raise_a_clear_error(src, words):
    with pytest.raises(SolutionMarkerError, match=words):
        strip_solutions(src)
    assert issubclass(SolutionMarkerError, ValueError)


def _solved_notebook(solution_source: str):
    cell = new_code_cell(solution_source, execution_count=3,
                         outputs=[new_output("stream", name="stdout", text="4\n")])
    cell.metadata.update({"tags": ["exercise"], "collapsed": False, "execution": {"iopub.status.busy": "x"}})
    nb = new_notebook(cells=[new_markdown_cell("# Title\n# BEGIN SOLUTION stays in markdown"), cell])
    nb.metadata["widgets"] = {"application/vnd.jupyter.widget-state+json": {"state": {}}}
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "My venv (3.11.7)", "language": "python"}
    return nb


def test_student_notebook_clears_outputs_and_noise_but_keeps_tags():
    nb = _solved_notebook("def f(x):\n    # BEGIN SOLUTION\n    return 2 * x\n    # END SOLUTION\nprint(f(2))")
    out = student.student_notebook(nb)
    code = out.cells[1]
    assert code.outputs == [] and code.execution_count is None
    assert code.metadata == {"tags": ["exercise"]}
    assert "return 2 * x" not in code.source and STUB in code.source and "print(f(2))" in code.source
    assert out.cells[0].source == nb.cells[0].source  # markdown is never touched
    assert "widgets" not in out.metadata and out.metadata.kernelspec["name"] == "python3"
    assert nb.cells[1].outputs, "the solved notebook must not be modified"
    nbformat.validate(out)


def test_student_notebook_names_the_cell_on_unbalanced_markers():
    nb = _solved_notebook("x = 1\n# BEGIN SOLUTION\nx = 2")
    with pytest.raises(SolutionMarkerError, match=r"01_x\.ipynb, cell 1 .*never closed"):
        student.student_notebook(nb, name="notebooks/01_x.ipynb")


def test_write_then_check_round_trip(tmp_path):
    src, out = tmp_path / "nb", tmp_path / "nb" / "student"
    src.mkdir()
    nbformat.write(_solved_notebook("# BEGIN SOLUTION\ny = 1\n# END SOLUTION\n"), src / "01_demo.ipynb")
    nbformat.write(new_notebook(), src / "scratch.ipynb")  # not NN_*: no student copy
    assert student.check_student_copies(src, out) == [out / "01_demo.ipynb"]  # missing
    student.write_student_copies(src, out)
    assert sorted(p.name for p in out.iterdir()) == ["01_demo.ipynb"]
    assert student.check_student_copies(src, out) == []
    stamp = (out / "01_demo.ipynb").stat().st_mtime_ns
    student.write_student_copies(src, out)  # idempotent: an up-to-date copy is not rewritten
    assert (out / "01_demo.ipynb").stat().st_mtime_ns == stamp
    # a solved notebook that changes makes the copy stale
    nbformat.write(_solved_notebook("# BEGIN SOLUTION\ny = 2\n# END SOLUTION\nz = 3\n"), src / "01_demo.ipynb")
    assert student.check_student_copies(src, out) == [out / "01_demo.ipynb"]
    student.write_student_copies(src, out)
    # a hand-edited copy that brings a solution back is reported
    text = (out / "01_demo.ipynb").read_text().replace("# YOUR CODE HERE", "# BEGIN SOLUTION")
    (out / "01_demo.ipynb").write_text(text)
    reasons = [why for _, why in student.student_copy_problems(src, out)]
    assert "stale" in reasons and "still contains a solution marker" in reasons
    # an orphaned copy (its solved notebook was removed) is reported, and removed by write
    (src / "01_demo.ipynb").unlink()
    assert student.check_student_copies(src, out) == [out / "01_demo.ipynb"]
    student.write_student_copies(src, out)
    assert list(out.glob("*.ipynb")) == []


def test_a_notebook_without_cell_ids_gives_the_same_copy_every_time(tmp_path):
    src, out = tmp_path / "nb", tmp_path / "out"
    src.mkdir()
    nb = _solved_notebook("# BEGIN SOLUTION\ny = 1\n# END SOLUTION\n")
    for cell in nb.cells:
        del cell["id"]
    (src / "02_noids.ipynb").write_text(nbformat.v4.nbjson.writes(nb, split_lines=True))
    student.write_student_copies(src, out)
    assert student.check_student_copies(src, out) == []


def test_nbgrader_markers_hidden_tests_and_written_answers():
    """nbgrader's conventions: ### markers, hidden tests removed, a written answer replaced by its stub."""
    assert strip_solutions("def f():\n    ### BEGIN SOLUTION\n    return 1\n    ### END SOLUTION") == \
        f"def f():\n    # YOUR CODE HERE\n    {STUB}"
    assert student.strip_hidden_tests("a\n### BEGIN HIDDEN TESTS\nsecret\n### END HIDDEN TESTS\nb") == "a\nb"
    with pytest.raises(SolutionMarkerError, match="never closed"):
        student.strip_hidden_tests("### BEGIN HIDDEN TESTS\nx")
    grading = {"grade": True, "grade_id": "t", "locked": True, "points": 2, "schema_version": 3, "solution": False}
    test_cell = new_code_cell("assert f() == 1\n### BEGIN HIDDEN TESTS\nassert f() != 2\n### END HIDDEN TESTS")
    test_cell.metadata["nbgrader"] = {**grading, "checksum": "abc", "cell_type": "code"}
    answer = new_markdown_cell("Why?\n### BEGIN SOLUTION\nBecause.\n### END SOLUTION")
    answer.metadata["nbgrader"] = {**grading, "grade_id": "why", "solution": True, "locked": False}
    whole = new_markdown_cell("The model answer, no markers.")
    whole.metadata["nbgrader"] = {**grading, "grade_id": "why2", "solution": True, "locked": False}
    code_whole = new_code_cell("x = 42")
    code_whole.metadata["nbgrader"] = {**grading, "grade_id": "sol", "solution": True, "grade": False, "locked": False}
    out = student.student_notebook(new_notebook(cells=[test_cell, answer, whole, code_whole]))
    assert [c.source for c in out.cells] == ["assert f() == 1", "Why?\nYOUR ANSWER HERE", "YOUR ANSWER HERE",
                                             "\n".join(student.STUB)]
    assert out.cells[0].metadata["nbgrader"] == grading, "grading fields kept, nbgrader's checksums dropped"
    assert not student.has_hidden_tests(out.cells[0].source) and student.has_hidden_tests(test_cell.source)


# --- hypothesis ------------------------------------------------------------------------------------

# Lines of code that are not markers (the alphabet has no newline; '#' lines may look like markers).
code_line = st.text(alphabet=st.characters(blacklist_characters="\n", blacklist_categories=("Cs",)), max_size=30)
code_line = code_line.filter(lambda s: not student.has_marker(s)) | st.sampled_from(
    ["# YOUR CODE HERE", "## BEGIN SOLUTION", "#BEGIN SOLUTIONS", "x = '# END SOLUTION'", "", "    "])
indent = st.sampled_from(["", "    ", "        ", "\t"])


@st.composite
def source_with_blocks(draw):
    """(source, kept lines outside the blocks, indents of the blocks in order)."""
    lines, kept, indents = [], [], []
    for _ in range(draw(st.integers(0, 4))):
        outside = draw(st.lists(code_line, max_size=4))
        lines += outside
        kept += outside
        ind = draw(indent)
        lines += [ind + "# BEGIN SOLUTION", *draw(st.lists(code_line, max_size=4)), ind + "# END SOLUTION"]
        kept.append(None)  # where a block was
        indents.append(ind)
    tail = draw(st.lists(code_line, max_size=4))
    return "\n".join(lines + tail), kept + tail, indents


@settings(max_examples=300, deadline=None)
@given(source_with_blocks())
def test_stripping_is_idempotent_leaves_no_marker_and_keeps_the_rest(case):
    source, kept, indents = case
    out = strip_solutions(source)
    assert strip_solutions(out) == out
    assert not student.has_marker(out)
    expected, blocks = [], iter(indents)
    for line in kept:
        if line is None:
            ind = next(blocks)
            expected += [ind + "# YOUR CODE HERE", ind + STUB]
        else:
            expected.append(line)
    assert out == "\n".join(expected)


@settings(max_examples=200, deadline=None)
@given(source_with_blocks(), st.data())
def test_any_extra_or_missing_marker_is_an_error(case, data):
    source, _, indents = case
    lines = source.split("\n")
    marker_rows = [i for i, line in enumerate(lines) if student.has_marker(line)]
    action = data.draw(st.sampled_from(["drop", "add_begin", "add_end", "nest"] if marker_rows else ["add_begin", "add_end"]))
    if action == "drop":
        del lines[data.draw(st.sampled_from(marker_rows))]
    elif action == "nest":  # a BEGIN inside an open block
        begins = [i for i in marker_rows if "BEGIN" in lines[i]]
        lines.insert(data.draw(st.sampled_from(begins)) + 1, "# BEGIN SOLUTION")
    else:
        marker = "# BEGIN SOLUTION" if action == "add_begin" else "# END SOLUTION"
        lines.insert(data.draw(st.integers(0, len(lines))), marker)
    with pytest.raises(SolutionMarkerError):
        strip_solutions("\n".join(lines))


# --- the committed notebooks -----------------------------------------------------------------------

def test_committed_student_copies_are_current():
    problems = student.student_copy_problems(NOTEBOOKS, NOTEBOOKS / "student")
    assert problems == [], f"{problems}: run `python -m labkit student` (make student) and commit notebooks/student/"


def test_no_student_copy_contains_a_solution():
    solved = sorted(NOTEBOOKS.glob(student.NOTEBOOK_GLOB))
    for path in solved:
        copy = student.read_notebook(NOTEBOOKS / "student" / path.name)
        cells = {c.get("id"): c for c in copy.cells}
        for cell in student.read_notebook(path).cells:
            if cell.cell_type != "code":
                continue
            twin = cells[cell.get("id")]
            assert not student.has_marker(twin.source), f"{path.name}: a marker in the student copy"
            for block in student.solution_blocks(cell.source):
                assert block not in twin.source, f"{path.name}: solution code left in the student copy"
                assert STUB in twin.source
            assert twin.outputs == [] and twin.execution_count is None
