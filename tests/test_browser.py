"""JupyterLab in headless Chromium: Run All on a lesson notebook (07, the capstone: it uses the most of labkit and
is the quickest to run), move its "Try it" slider, see the chart change.

Starts the venv's JupyterLab on a free 127.0.0.1 port with a random token, on a temporary COPY of
notebooks/ and with temporary Jupyter config/runtime/settings folders (your files and settings are not
touched), then drives Debian's /usr/bin/chromium with Playwright's sync API.
Run: .venv/bin/python -m pytest tests/test_browser.py -m browser
"""
from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

pytestmark = [pytest.mark.browser, pytest.mark.timeout(1500)]

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = ROOT / "notebooks"
LESSON = "07_capstone.ipynb"
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
SLIDER = ".widget-slider"  # IntSlider, FloatSlider, SelectionSlider… (ipywidgets 8, noUiSlider inside)
RUN_ALL_TIMEOUT_S = 900  # Run All takes < 2 min on an idle 2-core machine; CI may be slower and shared


def _require_chromium() -> None:
    if CHROMIUM.exists():
        return
    message = f"{CHROMIUM} is missing: install Debian's chromium (apt-get install -y chromium)"
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(f"{message}; CI must run the browser test")
    pytest.skip(message)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Lab:
    """A JupyterLab server on a temporary copy of a notebooks folder."""

    def __init__(self, notebooks: Path, tmp: Path):
        self.root = tmp / "notebooks"
        shutil.copytree(notebooks, self.root, ignore=shutil.ignore_patterns(".ipynb_checkpoints", "student"))
        self.port, self.token = _free_port(), secrets.token_hex(16)
        self.url = f"http://127.0.0.1:{self.port}"
        home = tmp / "jupyter"
        env = dict(os.environ,
                   PATH=str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", ""),
                   JUPYTER_CONFIG_DIR=str(home / "config"), JUPYTER_RUNTIME_DIR=str(home / "runtime"),
                   JUPYTERLAB_SETTINGS_DIR=str(home / "settings"),
                   JUPYTERLAB_WORKSPACES_DIR=str(home / "workspaces"), IPYTHONDIR=str(home / "ipython"))
        env.pop("JUPYTER_TOKEN", None)
        settings = {"apputils-extension/notification": '{"fetchNews": "false"}',  # no news pop-up
                    "docmanager-extension/plugin": '{"autosave": false}'}  # we save once, when done
        for name, text in settings.items():
            file = home / "settings" / "@jupyterlab" / f"{name}.jupyterlab-settings"
            file.parent.mkdir(parents=True, exist_ok=True)
            file.write_text(text)
        cmd = [sys.executable, "-m", "jupyterlab", "--no-browser", "--ip=127.0.0.1", f"--port={self.port}",
               "--ServerApp.port_retries=0", f"--IdentityProvider.token={self.token}",
               f"--ServerApp.root_dir={self.root}", "--LabApp.news_url=",
               "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate"]
        if os.geteuid() == 0:
            cmd.append("--allow-root")
        self.log = open(tmp / "jupyterlab.log", "w")
        self.proc = subprocess.Popen(cmd, cwd=self.root, env=env, stdin=subprocess.DEVNULL,
                                     stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)

    def api(self, path: str):
        req = urllib.request.Request(f"{self.url}{path}", headers={"Authorization": f"token {self.token}"})
        with urllib.request.urlopen(req, timeout=10) as r:
            return json.loads(r.read())

    def wait_ready(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"JupyterLab exited with {self.proc.returncode}; see {self.log.name}")
            try:
                self.api("/api/status")
                return
            except OSError:
                time.sleep(0.5)
        raise TimeoutError(f"JupyterLab did not answer within {timeout} s; see {self.log.name}")

    def kernels_idle(self) -> bool:
        kernels = self.api("/api/kernels")
        return bool(kernels) and all(k["execution_state"] == "idle" for k in kernels)

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:  # kernels run in their own sessions: shut them down through the server first
                for kernel in self.api("/api/kernels"):
                    req = urllib.request.Request(f"{self.url}/api/kernels/{kernel['id']}", method="DELETE",
                                                 headers={"Authorization": f"token {self.token}"})
                    urllib.request.urlopen(req, timeout=20).close()
            except OSError:
                pass
            os.killpg(self.proc.pid, 15)  # the server and its kernels (same session)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, 9)
                self.proc.wait(timeout=10)
        self.log.close()


def _wait(predicate, timeout: float, what: str, interval: float = 0.5):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")


# Marks the code cell with the "Try it" slider: the first cell with a slider after a "Try it" heading
# (else the first cell with a slider). Returns whether one was found in the cells attached right now.
_MARK_TRY_IT = """() => {
  const cells = [...document.querySelectorAll('.jp-NotebookPanel:not(.lm-mod-hidden) .jp-Cell')];
  const heading = cells.findIndex(c => c.classList.contains('jp-MarkdownCell') && /Try it/i.test(c.textContent));
  const hit = cells.slice(Math.max(heading, 0)).find(c => c.querySelector('SLIDER'))
           || cells.find(c => c.querySelector('SLIDER'));
  if (hit) hit.setAttribute('data-labkit-try-it', '1');
  return Boolean(hit);
}""".replace("SLIDER", SLIDER)


def _scroll_to_try_it(page, timeout: float = 120):
    """Scroll down step by step (cells far from the viewport may not be attached or rendered) until the
    "Try it" cell with its slider is found; return that cell scrolled into view."""
    scroller = page.locator(".jp-NotebookPanel:not(.lm-mod-hidden) .jp-WindowedPanel-outer").first
    scroller.evaluate("el => el.scrollTop = 0")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if page.evaluate(_MARK_TRY_IT):
            cell = page.locator("[data-labkit-try-it]").first
            cell.locator(SLIDER).first.scroll_into_view_if_needed(timeout=10_000)
            return cell
        at_end = scroller.evaluate("el => { const end = el.scrollTop + el.clientHeight >= el.scrollHeight - 2;"
                                   " el.scrollBy(0, el.clientHeight * 0.8); return end; }")
        time.sleep(0.3)
        if at_end:
            scroller.evaluate("el => el.scrollTop = 0")  # once more from the top (late renders)
            time.sleep(1)
    raise AssertionError(f"no ipywidgets slider ({SLIDER}) found in the notebook after Run All")


def run_notebook_and_move_slider(notebooks: Path, name: str, tmp_path: Path) -> dict:
    """Open `name` in JupyterLab, Run All, move the first slider; return what was seen."""
    from playwright.sync_api import sync_playwright

    lab = Lab(notebooks, tmp_path)
    shot = tmp_path / "screenshot.png"
    try:
        lab.wait_ready()
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
            try:
                page = browser.new_page(viewport={"width": 1400, "height": 1000})
                page.set_default_timeout(60_000)
                try:
                    return _drive(page, lab, name)
                except Exception:
                    page.screenshot(path=str(shot))
                    raise
            finally:
                browser.close()
    except Exception as e:
        raise AssertionError(f"{type(e).__name__}: {e}\n(screenshot: {shot}; server log: {lab.log.name})") from e
    finally:
        lab.stop()


def _drive(page, lab: Lab, name: str) -> dict:
    page.goto(f"{lab.url}/lab/tree/{name}?token={lab.token}", timeout=120_000)
    panel = page.locator(".jp-NotebookPanel:not(.lm-mod-hidden)").first
    panel.locator(".jp-Cell").first.wait_for(timeout=120_000)
    # the kernel has started and is idle (Run All before that may be lost)
    indicator = panel.locator(".jp-Notebook-ExecutionIndicator")
    _wait(lambda: indicator.get_attribute("data-status") == "idle" and lab.kernels_idle(), 180, "an idle kernel")

    page.locator(".lm-MenuBar-itemLabel", has_text="Run").first.click()
    page.locator(".lm-Menu-itemLabel", has_text="Run All Cells").first.click()
    started = time.monotonic()
    # finished = the kernel and the UI stay idle for 3 polls in a row (cells queue back to back)
    streak = {"n": 0}

    def finished() -> bool:
        idle = indicator.get_attribute("data-status") == "idle" and lab.kernels_idle()
        streak["n"] = streak["n"] + 1 if idle and time.monotonic() - started > 2 else 0
        return streak["n"] >= 3
    _wait(finished, RUN_ALL_TIMEOUT_S, "Run All to finish", interval=1.0)
    run_all_s = time.monotonic() - started

    # save (into the temporary copy) and read the outputs: every code cell ran, none has an error
    path = lab.root / name
    mtime = path.stat().st_mtime_ns
    page.keyboard.press("Control+s")
    dirty = page.locator(".lm-DockPanel-tabBar .lm-TabBar-tab.jp-mod-dirty")
    _wait(lambda: path.stat().st_mtime_ns != mtime and not dirty.count(), 60, "the notebook to be saved")
    nb = nbformat.read(path, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    errors = [(i, o.get("ename"), o.get("evalue")) for i, c in enumerate(nb.cells) if c.cell_type == "code"
              for o in c.outputs if o.output_type == "error"]
    assert not errors, f"cells raised errors after Run All: {errors}"
    not_run = [i for i, c in enumerate(nb.cells) if c.cell_type == "code" and c.execution_count is None]
    assert not not_run, f"cells {not_run} did not run"
    assert not page.locator(".jp-OutputArea-output", has_text="Traceback (most recent call last)").count()

    # the "Try it" slider: read the chart, press ArrowRight on the handle, wait for a new chart
    cell = _scroll_to_try_it(page)
    slider = cell.locator(SLIDER).first
    images = cell.locator(".jp-OutputArea-output img")
    _wait(lambda: images.count() > 0, 60, "the chart image of the slider's cell")
    before = images.first.get_attribute("src")
    handle = slider.locator(".noUi-handle").first  # role="slider", focusable, arrows move it one step
    value = lambda: handle.get_attribute("aria-valuetext")  # noqa: E731
    value_before = value()
    handle.focus()
    page.keyboard.press("ArrowRight")
    if value() == value_before:  # already at the maximum
        page.keyboard.press("ArrowLeft")

    def new_chart():
        srcs = [images.nth(i).get_attribute("src") for i in range(images.count())]
        return next((s for s in srcs if s and s != before), None)
    after = _wait(new_chart, 120, "the chart to be redrawn after moving the slider")
    assert not cell.locator(".jp-OutputArea-output", has_text="Traceback").count(), "the widget raised"
    return {"cells": len(code), "run_all_s": run_all_s, "value_before": value_before,
            "value_after": value(),
            "before": before, "after": after}


def _tiny_lab(folder: Path) -> Path:
    """A small notebook shaped like a lesson: many cells, then a "Try it" interact slider over a chart."""
    cells = [new_markdown_cell("# Tiny lab"),
             new_code_cell("import ipywidgets as widgets, matplotlib.pyplot as plt, numpy as np\n"
                           "from ipywidgets import interact"),
             new_code_cell("widgets.FloatSlider(value=0.5)  # a slider that is not the Try-it one")]
    for i in range(20):  # enough cells that the widget starts far below the viewport
        cells += [new_markdown_cell(f"## Section {i}\n" + "Some words. " * 60), new_code_cell(f"print({i} * 2)")]
    cells += [new_markdown_cell("## Try it"),
              new_code_cell("def chart(n=3):\n    fig, ax = plt.subplots(figsize=(4, 3))\n"
                            "    ax.bar(range(n), np.arange(1, n + 1))\n    plt.show()\n\n"
                            "interact(chart, n=widgets.IntSlider(value=3, min=1, max=10));"),
              new_code_cell("chart(3)")]
    nb = new_notebook(cells=cells)
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3 (ipykernel)", "language": "python"}
    folder.mkdir()
    nbformat.write(nb, folder / "00_tiny.ipynb")
    return folder


def test_harness_on_a_tiny_notebook(tmp_path):
    """The harness itself, on a generated notebook (tells a broken harness from a broken lesson)."""
    _require_chromium()
    seen = run_notebook_and_move_slider(_tiny_lab(tmp_path / "nb"), "00_tiny.ipynb", tmp_path)
    assert seen["before"] != seen["after"] and seen["value_before"] == "3" and seen["value_after"] == "4"


def test_a_lesson_runs_in_jupyterlab_and_its_slider_redraws_the_chart(tmp_path):
    _require_chromium()
    assert (NOTEBOOKS / LESSON).exists(), f"{NOTEBOOKS / LESSON} is missing"
    seen = run_notebook_and_move_slider(NOTEBOOKS, LESSON, tmp_path)
    print(f"{LESSON}: Run All took {seen['run_all_s']:.0f} s in JupyterLab; "
          f"slider {seen['value_before']} → {seen['value_after']} redrew the chart")
    assert seen["before"] != seen["after"]
