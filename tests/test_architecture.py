"""labkit's layout (CONTRIBUTING.md, "Where code goes: floors"): every import goes down a floor or stays on it, no
import circle (imports inside functions count; `if TYPE_CHECKING:` blocks do not), and no lesson module over ~500
lines. Read from the source with ast, so a new module is checked without being listed here."""
import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parent.parent / "labkit"
FLOOR_1 = {"repro", "checks", "memory"}
FLOOR_2 = {"models", "data", "evaluate"}
FLOOR_5 = {"plots", "widgets", "__main__", "__init__"}
LESSON_MODULE_MAX_LINES = 500


def _name(path: Path) -> str:
    rel = path.relative_to(PKG).with_suffix("")
    return ".".join(rel.parts)


MODULES = {_name(p): p for p in PKG.rglob("*.py")}
MODULES = {("experiments" if k == "experiments.__init__" else k): p for k, p in MODULES.items()}


def floor(module: str) -> int:
    if module in FLOOR_1:
        return 1
    if module in FLOOR_2:
        return 2
    if module == "experiments" or module.startswith("experiments."):
        return 4
    if module in FLOOR_5:
        return 5
    return 3


def _type_checking_lines(tree) -> set[int]:
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for sub in node.body:
                out.update(range(sub.lineno, (sub.end_lineno or sub.lineno) + 1))
    return out


def imports(module: str) -> set[str]:
    """The labkit modules `module` imports (anywhere in the file but TYPE_CHECKING blocks)."""
    path = MODULES[module]
    tree = ast.parse(path.read_text(encoding="utf-8"))
    skip = _type_checking_lines(tree)
    package = module.split(".")[:-1] if path.name != "__init__.py" else module.split(".")
    if module == "experiments":
        package = ["experiments"]
    found = set()
    for node in ast.walk(tree):
        if getattr(node, "lineno", None) in skip:
            continue
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names if a.name.startswith("labkit.")]
            found.update(n.removeprefix("labkit.") for n in names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
            elif node.module and (node.module == "labkit" or node.module.startswith("labkit.")):
                base = []
            else:
                continue
            mod = [*base, *(node.module.removeprefix("labkit").lstrip(".").split(".") if node.module else [])]
            mod = [m for m in mod if m and m != "labkit"]
            for a in node.names:  # `from . import quantize` names a module; `from .quantize import X` does not
                cand = ".".join([*mod, a.name])
                found.add(cand if cand in MODULES else ".".join(mod))
    return {f for f in found if f in MODULES and f != module}


GRAPH = {m: imports(m) for m in MODULES}


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_go_down_a_floor_or_stay(module):
    up = sorted(i for i in GRAPH[module] if floor(i) > floor(module))
    assert not up, f"labkit.{module} (floor {floor(module)}) imports {up} from a floor above it"


def test_no_import_circle():
    state, stack = {}, []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for n in sorted(GRAPH[m]):
            if state.get(n) == "open":
                cycle = stack[stack.index(n):] + [n]
                pytest.fail("import circle: " + " → ".join(cycle))
            if n not in state:
                visit(n)
        stack.pop()
        state[m] = "done"

    for m in sorted(GRAPH):
        if m not in state:
            visit(m)


@pytest.mark.parametrize("module", sorted(m for m in MODULES if floor(m) == 3))
def test_lesson_modules_fit_in_a_readers_head(module):
    lines = len(MODULES[module].read_text(encoding="utf-8").splitlines())
    assert lines <= LESSON_MODULE_MAX_LINES, f"labkit/{module}.py has {lines} lines: split an idea into its own module"
