"""Developer commands: `python -m labkit <command>` (run from anywhere; paths are relative to your cwd).

  prepare                 build the model cache and the token caches (quick when already built)
  bench [--only a,b]      print one JSON object {module: module.bench()} of the lab's headline figures
  results MODULE          run labkit.MODULE.make_results() and write data/results/MODULE.json atomically
  execute NB [NB ...]     execute notebooks in place (cwd = the notebook's folder), then clean them
  clean [--check] NB ...  strip metadata noise (outputs are kept); --check only lists what would change
  student [--check]       write notebooks/student/ copies with solutions stubbed; --check verifies them
  compress --budget B --out DIR [--ram] [--force]   export SmolLM2 compressed to fit B (0.25 of fp32, bytes,
                          or 64MB) on disk or, with --ram, in RAM once loaded; with a checksummed report
  teach course DIR | points | hub   an nbgrader course folder, the exercises' points, a JupyterHub memory limit
"""
from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
import traceback
from pathlib import Path

from labkit import student as _student
from labkit.experiments.runtimes import CELL_TIMEOUT_S, execute_notebook

PACKAGE_DIR = Path(__file__).resolve().parent
REPO_ROOT = PACKAGE_DIR.parent
NOTEBOOKS = REPO_ROOT / "notebooks"
STUDENT = NOTEBOOKS / "student"


def _err(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# --- prepare -------------------------------------------------------------------------------------

def cmd_prepare(args) -> int:
    from transformers import AutoTokenizer

    from labkit import data, models
    t0 = time.perf_counter()
    folders = {name: models.prepare(name) for name in models.REGISTRY}  # converts once, verifies after
    for name, folder in folders.items():
        _err(f"prepare: {name}: {folder}")
    tokens = data.prepare(AutoTokenizer.from_pretrained(str(folders["smollm2-135m"])))
    _err(f"prepare: token caches {tokens}; ready in {time.perf_counter() - t0:.1f} s")
    return 0


# --- bench ---------------------------------------------------------------------------------------

def bench_modules() -> list[str]:
    """Names of the experiments with a bench() (the explicit registry in labkit.experiments)."""
    from labkit.experiments import EXPERIMENTS
    return list(EXPERIMENTS)


def cmd_bench(args) -> int:
    from labkit import experiments
    names = bench_modules()
    if args.only:
        wanted = [n.strip() for n in args.only.split(",") if n.strip()]
        unknown = [n for n in wanted if n not in names]
        if unknown or not wanted:
            _err(f"bench: no experiment {', '.join(unknown) or repr(args.only)}; known: {', '.join(names)}")
            return 2
        names = wanted
    report, failed = {}, False
    for name in names:
        t0 = time.perf_counter()
        try:
            with contextlib.redirect_stdout(sys.stderr):  # stdout carries the JSON only
                report[name] = experiments.load(name).bench()
            json.dumps(report[name])
        except Exception as e:  # one failing section does not hide the others
            traceback.print_exc()
            report[name], failed = {"error": f"{type(e).__name__}: {e}"}, True
        _err(f"bench: {name} took {time.perf_counter() - t0:.1f} s")
    print(json.dumps(report, indent=2))
    return 1 if failed else 0


# --- results -------------------------------------------------------------------------------------

def cmd_results(args) -> int:
    from labkit import experiments, repro
    try:
        module = experiments.load(args.module)
    except ValueError as e:
        _err(f"results: {e}")
        return 2
    if not hasattr(module, "make_results"):
        have = [n for n in experiments.EXPERIMENTS if hasattr(experiments.load(n), "make_results")]
        _err(f"results: the experiment {args.module!r} caches no results; those that do: {', '.join(have)}")
        return 2
    t0 = time.perf_counter()
    obj = module.make_results()
    path = repro.atomic_write_json(repro.results_path(args.module), obj)
    _err(f"results: wrote {path} in {time.perf_counter() - t0:.1f} s")
    return 0


# --- execute / clean -----------------------------------------------------------------------------

def _write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


def _readable_notebooks(command: str, names: list[str]) -> bool:
    """True when every name is a readable notebook; otherwise say which are not (nothing is changed)."""
    bad = []
    for name in names:
        try:
            _student.read_notebook(name)
        except (OSError, ValueError) as e:
            bad.append(str(e))
    for msg in bad:
        _err(f"{command}: {msg}")
    if bad:
        _err(f"{command}: nothing was changed; usage: python -m labkit {command} notebooks/NN_name.ipynb ...")
    return not bad


def cmd_execute(args) -> int:
    from nbclient.exceptions import CellExecutionError
    if not _readable_notebooks("execute", args.notebooks):
        return 2
    status = 0
    for name in args.notebooks:
        path = Path(name).resolve()
        try:
            seconds = execute_notebook(path, timeout=args.timeout)
        except CellExecutionError as e:
            _err(f"execute: {name} FAILED (left unchanged):\n{e}")
            status = 1
            continue
        print(f"{name}: executed in {seconds:.1f} s", flush=True)
    return status


def cmd_clean(args) -> int:
    if not _readable_notebooks("clean", args.notebooks):
        return 2
    changed = []
    for name in args.notebooks:
        path = Path(name)
        text = path.read_text(encoding="utf-8")
        cleaned = _student.notebook_text(_student.clean_notebook(_student.read_notebook(path)))
        if cleaned != text:
            changed.append(name)
            if not args.check:
                _write(path, cleaned)
    if args.check and changed:
        _err("clean --check: these notebooks carry metadata noise; run `python -m labkit clean` on them:")
        for name in changed:
            _err(f"  {name}")
        return 1
    for name in changed:
        print(f"cleaned {name}")
    return 0


# --- student -------------------------------------------------------------------------------------

def cmd_student(args) -> int:
    src, out = Path(args.src), Path(args.out)
    try:
        if args.check:
            problems = _student.student_copy_problems(src, out)
            for path, why in problems:
                _err(f"student --check: {path}: {why}")
            if problems:
                _err("run `python -m labkit student` (or `make student`) and commit notebooks/student/")
            return 1 if problems else 0
        for path in _student.write_student_copies(src, out):
            print(f"wrote {path}")
    except _student.SolutionMarkerError as e:
        _err(f"student: {e}")
        return 1
    return 0


# --- compress (notebook 07) ------------------------------------------------------------------------

def cmd_compress(args) -> int:
    from labkit import capstone
    from labkit.experiments.capstone import compress_for_budget
    try:
        compress_for_budget(args.budget, args.out, results=args.results, max_tokens=args.tokens, log=_err,
                            kind="ram" if args.ram else "disk", force=args.force)
    except (capstone.BudgetError, ValueError, TypeError, FileNotFoundError, FileExistsError) as e:
        _err(f"compress: {e}")
        return 2
    return 0


# --- command line --------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m labkit", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("prepare", help="build the model and token caches").set_defaults(fn=cmd_prepare)
    b = sub.add_parser("bench", help="print the headline figures as JSON")
    b.add_argument("--only", help="comma-separated module names, e.g. memory,quantize")
    b.set_defaults(fn=cmd_bench)
    r = sub.add_parser("results", help="regenerate data/results/MODULE.json")
    r.add_argument("module")
    r.set_defaults(fn=cmd_results)
    e = sub.add_parser("execute", help="execute notebooks in place, then clean them")
    e.add_argument("notebooks", nargs="+")
    e.add_argument("--timeout", type=int, default=CELL_TIMEOUT_S, help="seconds per cell (default 600)")
    e.set_defaults(fn=cmd_execute)
    c = sub.add_parser("clean", help="strip metadata noise from notebooks")
    c.add_argument("--check", action="store_true", help="change nothing; exit 1 listing noisy notebooks")
    c.add_argument("notebooks", nargs="*")
    c.set_defaults(fn=cmd_clean)
    s = sub.add_parser("student", help="write or check the student copies")
    s.add_argument("--check", action="store_true", help="exit 1 if a copy is missing, stale or has a solution")
    s.add_argument("--src", default=str(NOTEBOOKS), help=argparse.SUPPRESS)
    s.add_argument("--out", default=str(STUDENT), help=argparse.SUPPRESS)
    s.set_defaults(fn=cmd_student)
    k = sub.add_parser("compress", help="export SmolLM2 compressed to fit a memory budget (notebook 07)")
    k.add_argument("--budget", required=True, help="fraction of fp32 bytes (0.25), bytes, or a size such as 64MB")
    k.add_argument("--out", required=True, help="folder for model.safetensors, tokenizer files and report.json")
    k.add_argument("--tokens", type=int, default=None, help="validation tokens for perplexity (default: lk's)")
    k.add_argument("--ram", action="store_true", help="fit the budget in RAM once loaded (default: bytes on disk)")
    k.add_argument("--force", action="store_true", help="replace a previous labkit export in --out")
    k.add_argument("--results", default=None, help=argparse.SUPPRESS)  # another capstone.json (tests)
    k.set_defaults(fn=cmd_compress)
    t = sub.add_parser("teach", help="classroom: nbgrader course folder, points, JupyterHub memory (docs/teaching.md)",
                       add_help=False)
    t.add_argument("rest", nargs=argparse.REMAINDER)
    t.set_defaults(fn=cmd_teach)
    return p


def cmd_teach(args) -> int:
    from . import teach
    return teach.main(args.rest)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["teach"]:  # its own parser, options included (argparse's REMAINDER drops a leading --help)
        return cmd_teach(argparse.Namespace(rest=argv[1:]))
    args = build_parser().parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
