"""`python -m labkit` on tiny generated notebooks: execute, clean, student, bench, results (fast)."""
from __future__ import annotations

import json
import subprocess
import sys
import types
from pathlib import Path

import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

from labkit import __main__ as cli
from labkit import repro, student


def _tiny(path: Path, *sources: str, noisy: bool = True) -> Path:
    nb = new_notebook(cells=[new_markdown_cell("# Tiny"), *(new_code_cell(s) for s in sources)])
    if noisy:
        nb.cells[1].metadata.update({"collapsed": True, "scrolled": "auto", "tags": ["nbval-ignore-output"],
                                     "execution": {"iopub.execute_input": "2026-01-01T00:00:00Z"}})
        nb.metadata["widgets"] = {"application/vnd.jupyter.widget-state+json": {"state": {}, "version_major": 2}}
        nb.metadata["kernelspec"] = {"name": "venv-xyz", "display_name": "Python (.venv)", "language": "python"}
        nb.metadata["language_info"] = {"name": "python", "version": "3.11.7", "mimetype": "text/x-python"}
    nbformat.write(nb, path)
    return path


def test_help_runs_as_a_module():
    out = subprocess.run([sys.executable, "-m", "labkit", "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "student" in out.stdout and "execute" in out.stdout


def test_clean_strips_noise_and_check_reports_it(tmp_path, capsys):
    nb = _tiny(tmp_path / "01_t.ipynb", "x = 1")
    assert cli.main(["clean", "--check", str(nb)]) == 1
    assert str(nb) in capsys.readouterr().err
    before = nb.read_text()
    assert cli.main(["clean", "--check", str(nb)]) == 1 and nb.read_text() == before  # --check writes nothing
    assert cli.main(["clean", str(nb)]) == 0
    cleaned = json.loads(nb.read_text())
    assert cleaned["cells"][1]["metadata"] == {"tags": ["nbval-ignore-output"]}
    assert "widgets" not in cleaned["metadata"]
    assert cleaned["metadata"]["kernelspec"]["name"] == "python3"
    assert cleaned["metadata"]["language_info"] == {"name": "python"}
    assert cli.main(["clean", "--check", str(nb)]) == 0
    text = nb.read_text()
    assert cli.main(["clean", str(nb)]) == 0 and nb.read_text() == text  # idempotent


def test_execute_runs_in_the_notebook_folder_with_this_python_and_cleans(tmp_path, capsys):
    nb = _tiny(tmp_path / "01_t.ipynb",
               "import os, sys\nprint(os.path.basename(os.getcwd()))\nprint(sys.executable)",
               "print(6 * 7)")
    assert cli.main(["execute", str(nb)]) == 0
    assert "executed in" in capsys.readouterr().out
    done = nbformat.read(nb, as_version=4)
    cwd, exe = done.cells[1].outputs[0]["text"].split()
    assert cwd == tmp_path.name
    assert Path(exe).resolve() == Path(sys.executable).resolve()
    assert done.cells[2].outputs[0]["text"] == "42\n" and done.cells[2].execution_count == 2
    assert done.cells[1].metadata == {"tags": ["nbval-ignore-output"]}
    assert cli.main(["clean", "--check", str(nb)]) == 0


def test_execute_failure_leaves_the_notebook_unchanged(tmp_path, capsys):
    nb = _tiny(tmp_path / "01_t.ipynb", "raise ValueError('boom')", noisy=False)
    before = nb.read_text()
    assert cli.main(["execute", str(nb)]) == 1
    assert "boom" in capsys.readouterr().err
    assert nb.read_text() == before


def test_student_write_and_check(tmp_path, capsys):
    src, out = tmp_path / "nb", tmp_path / "nb" / "student"
    src.mkdir()
    _tiny(src / "01_t.ipynb", "def f(x):\n    # BEGIN SOLUTION\n    return x + 1\n    # END SOLUTION")
    args = ["--src", str(src), "--out", str(out)]
    assert cli.main(["student", "--check", *args]) == 1
    assert "missing" in capsys.readouterr().err
    assert cli.main(["student", *args]) == 0
    assert cli.main(["student", "--check", *args]) == 0
    copy = nbformat.read(out / "01_t.ipynb", as_version=4)
    assert "return x + 1" not in copy.cells[1].source and "NotImplementedError" in copy.cells[1].source
    _tiny(src / "02_bad.ipynb", "# BEGIN SOLUTION\nx = 1")
    assert cli.main(["student", *args]) == 1
    err = capsys.readouterr().err
    assert "02_bad.ipynb, cell 1" in err and "never closed" in err
    assert not (out / "02_bad.ipynb").exists()


@pytest.fixture
def fake_modules(monkeypatch):
    ok = types.ModuleType("labkit.fake_ok")
    ok.bench = lambda: (print("noise that must not reach stdout"), {"ratio": 1.5})[1]
    ok.make_results = lambda: {"points": [1, 2, 3]}
    bad = types.ModuleType("labkit.fake_bad")
    bad.bench = lambda: 1 / 0
    monkeypatch.setitem(sys.modules, "labkit.fake_ok", ok)
    monkeypatch.setitem(sys.modules, "labkit.fake_bad", bad)
    from labkit import experiments
    monkeypatch.setattr(experiments, "EXPERIMENTS", {"fake_bad": "labkit.fake_bad", "fake_ok": "labkit.fake_ok"})


def test_bench_prints_one_json_object_and_fails_on_a_broken_section(fake_modules, capsys):
    assert cli.main(["bench", "--only", "fake_ok"]) == 0
    out = capsys.readouterr().out
    assert json.loads(out) == {"fake_ok": {"ratio": 1.5}}
    assert cli.main(["bench"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["fake_ok"] == {"ratio": 1.5} and "ZeroDivisionError" in report["fake_bad"]["error"]
    assert cli.main(["bench", "--only", "nope"]) == 2


def test_every_registered_experiment_has_a_bench_and_the_results_files_have_their_experiment():
    from labkit import experiments
    names = cli.bench_modules()
    assert names == list(experiments.EXPERIMENTS)
    for name in names:
        assert callable(experiments.load(name).bench), name
    for path in sorted((cli.REPO_ROOT / "data" / "results").glob("*.json")):
        assert callable(getattr(experiments.load(path.stem), "make_results", None)), path.name
    with pytest.raises(ValueError, match="known:"):
        experiments.load("no_such_experiment")


def test_results_writes_json_atomically(fake_modules, tmp_path, monkeypatch):
    monkeypatch.setattr(repro, "results_path", lambda name: tmp_path / f"{name}.json")
    assert cli.main(["results", "fake_ok"]) == 0
    assert json.loads((tmp_path / "fake_ok.json").read_text()) == {"points": [1, 2, 3]}
    assert [p.name for p in tmp_path.iterdir()] == ["fake_ok.json"]  # no temp file left behind
    assert cli.main(["results", "fake_bad"]) == 2  # no make_results()
    assert cli.main(["results", "no_such_module"]) == 2


def test_clean_notebooks_in_the_repository_are_clean():
    notebooks = sorted((Path(__file__).resolve().parent.parent / "notebooks").glob(student.NOTEBOOK_GLOB))
    noisy = [p.name for p in notebooks
             if student.notebook_text(student.clean_notebook(student.read_notebook(p))) != p.read_text()]
    assert noisy == [], f"run `python -m labkit clean` on {noisy}"
