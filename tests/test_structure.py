"""The package's shape, from its source: no import circles, no import from a lower floor to a
higher one, each run-directory file named in one module, and a torch-free ground floor."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "cnnlab"

# The floors, from the ground up: a module may import its own floor and those below, never above.
FLOORS = [
    {"errors", "files", "images", "card", "rundir", "devices", "registry"},
    {"data"},
    {"models"},
    {"training"},
    {"evaluation"},
    {"deploy"},
    {"insight"},
    {"cli", "__main__", "__init__"},
]
RUN_FILES = ("model.json", "model.safetensors", "config.yaml", "metrics.jsonl", "checkpoint.pt", "summary.json",
             "eval.json", "skipped.txt", "report.html", "model.onnx", "model.torchscript.pt")


def modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" and len(parts) > 1 else parts)
        found[name] = path
    return found


def imports(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The cnnlab modules `name` imports, lazy imports included."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        targets = []
        if isinstance(node, ast.Import):
            targets = [a.name[len("cnnlab."):] for a in node.names if a.name.startswith("cnnlab.")]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".") if package else []
                base = base[:len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            elif (node.module or "").startswith("cnnlab"):
                target = node.module[len("cnnlab."):] if node.module != "cnnlab" else ""
            else:
                continue
            targets = [f"{target}.{a.name}".strip(".") for a in node.names]
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name:
                out.add(target)
    return out


def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imports(name, path, known) for name, path in known.items()}


def floor(name: str) -> int:
    top = name.split(".")[0]
    return next(i for i, group in enumerate(FLOORS) if top in group)


def test_every_module_stands_on_a_floor():
    for name in graph():
        assert floor(name) is not None, name


def test_no_import_circles():
    edges = graph()
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    circles: list[list[str]] = []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    for v in edges:
        if v not in index:
            visit(v)
    assert circles == []


def test_no_import_runs_up_to_a_higher_floor():
    upward = [f"{a} -> {b}" for a, targets in graph().items() for b in targets
              if a != "__init__" and floor(b) > floor(a)]
    assert upward == []


def test_each_run_directory_file_is_named_in_one_module_only():
    spelled: dict[str, set[str]] = {}
    for name, path in modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and node.value in RUN_FILES:
                spelled.setdefault(node.value, set()).add(name)
    assert spelled == {file: {"rundir"} for file in RUN_FILES}


def test_the_ground_floor_and_the_onnx_runtime_import_without_torch():
    blocked = ("import sys\n"
               "class Block:\n"
               "    def find_spec(self, name, path=None, target=None):\n"
               "        if name.split('.')[0] in ('torch', 'torchvision', 'safetensors'):\n"
               "            raise ImportError('blocked: ' + name)\n"
               "sys.meta_path.insert(0, Block())\n"
               "import cnnlab.card, cnnlab.rundir, cnnlab.images.spec, cnnlab.images.arrays\n"
               "import cnnlab.deploy.onnx_runtime\n"
               "print('ok')\n")
    result = subprocess.run([sys.executable, "-c", blocked], capture_output=True, text=True, timeout=120)
    assert result.stdout.strip() == "ok", result.stderr
