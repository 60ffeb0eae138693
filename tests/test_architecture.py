"""The layers of the tree, read from the code's own imports (ast): imports run one way, with no cycles.

    sparse, fcmae.runtime            stand alone (torch, timm, the standard library)
    fcmae.data, fcmae.weights        may use the two above
    fcmae.model, fcmae.eval          may use the layers above
    fcmae.pretrain                   may use every fcmae package above
    fcmae.tools                      may use all of fcmae
    finetune                         stands on fcmae; nothing in sparse or fcmae imports it

A function-local import is allowed only with a reason in a comment on its
line (an optional package, or a module that must not load torch early), and
there are few of them.
"""

import ast
import importlib
import importlib.util
import subprocess
import sys
from pathlib import Path
from typing import Dict, Iterator, List, Set, Tuple

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("sparse", "fcmae", "finetune")
MAX_LOCAL_IMPORTS = 16

# layer -> the layers it may import (its own included)
ALLOWED = {
    "sparse": {"sparse"},
    "runtime": {"runtime"},
    "data": {"data", "runtime", "sparse"},
    "weights": {"weights", "runtime", "sparse"},
    "model": {"model", "sparse", "runtime"},
    "eval": {"eval", "data", "runtime", "sparse"},
    "pretrain": {"pretrain", "model", "eval", "data", "weights", "runtime", "sparse"},
    "tools": {"tools", "pretrain", "model", "eval", "data", "weights", "runtime", "sparse"},
    "entry": {"tools", "pretrain", "model", "eval", "data", "weights", "runtime", "sparse"},
    "finetune": {"finetune", "tools", "pretrain", "model", "eval", "data", "weights", "runtime", "sparse", "entry"},
}


def layer_of(module: str) -> str:
    """The layer a dotted module name belongs to."""
    parts = module.split(".")
    if parts[0] in ("sparse", "finetune"):
        return parts[0]
    if len(parts) == 1 or parts[1] == "main_pretrain":  # the package itself, the deprecated entry point
        return "entry"
    if parts[1] == "model":
        return "model"
    if parts[1] in ("runtime", "data", "weights", "eval", "pretrain", "tools"):
        return parts[1]
    raise AssertionError(f"{module} is in no layer: add its package to tests/test_architecture.py")


def module_name(path: Path) -> str:
    rel = path.relative_to(REPO).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def project_modules() -> Dict[str, Path]:
    return {module_name(p): p for pkg in PACKAGES for p in sorted((REPO / pkg).rglob("*.py"))}


def imports_of(path: Path, modules: Set[str]) -> Iterator[Tuple[str, int, bool, str]]:
    """(imported project module, line, function-local?, source line) for each project import in `path`."""
    source = path.read_text()
    lines = source.splitlines()
    tree = ast.parse(source)
    local_nodes = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
                   for n in ast.walk(f) if isinstance(n, (ast.Import, ast.ImportFrom))}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}" in modules else node.module
                     for alias in node.names]
        else:
            continue
        for name in names:
            if name.split(".")[0] in PACKAGES:
                yield name, node.lineno, id(node) in local_nodes, lines[node.lineno - 1]


def graph() -> Dict[str, Set[str]]:
    modules = project_modules()
    return {name: {imported for imported, *_ in imports_of(path, set(modules))} - {name}
            for name, path in modules.items()}


def broken_rules(edges: Dict[str, Set[str]]) -> List[str]:
    """'importer -> imported' for every import that runs against the layers."""
    return sorted(f"{a} -> {b}" for a, targets in edges.items() for b in targets
                  if layer_of(b) not in ALLOWED[layer_of(a)])


def cycles(edges: Dict[str, Set[str]]) -> List[List[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    on_stack: Set[str] = set()
    found: List[List[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in edges.get(node, ()):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return found


def test_imports_run_one_way():
    assert broken_rules(graph()) == []


def test_there_are_no_import_cycles():
    assert cycles(graph()) == []


def test_every_module_is_in_a_layer():
    for name in project_modules():
        assert layer_of(name) in ALLOWED


@pytest.mark.parametrize("importer, imported", [
    # the seven kinds of import that ran against the layers before the tree was reorganised
    ("fcmae.pretrain.init", "finetune.convert"),  # fcmae imported finetune
    ("fcmae.eval.knn", "finetune.data"),
    ("fcmae.tools.bench_encoder", "finetune.convert"),
    ("sparse.bench", "fcmae.model"),  # sparse imported fcmae
    ("fcmae.runtime.loader", "fcmae.data.folder"),  # the runtime imported domain code
    ("fcmae.runtime.settings", "sparse.sizes"),
    ("fcmae.runtime.command", "sparse"),
    ("fcmae.data.stats", "fcmae.pretrain.config"),  # a lower layer reaching up
])
def test_the_rules_catch_the_old_violations(importer, imported):
    assert broken_rules({importer: {imported}}) == [f"{importer} -> {imported}"]


def test_the_cycle_check_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def local_imports(path: Path) -> List[Tuple[int, str]]:
    """(line, text) of every import inside a function of `path`, of any module."""
    source = path.read_text()
    lines = source.splitlines()
    found = {node.lineno for function in ast.walk(ast.parse(source))
             if isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef))
             for node in ast.walk(function) if isinstance(node, (ast.Import, ast.ImportFrom))}
    return [(line, lines[line - 1]) for line in sorted(found)]


def test_function_local_imports_are_few_and_each_says_why():
    local = [(name, line, text) for name, path in project_modules().items() for line, text in local_imports(path)]
    without_reason = [f"{name}:{line}: {text.strip()}" for name, line, text in local if "#" not in text]
    assert without_reason == []
    assert len(local) <= MAX_LOCAL_IMPORTS, [f"{name}:{line}" for name, line, _ in local]


def test_one_patch_size():
    definitions = [f"{name}" for name, path in project_modules().items()
                   for node in ast.walk(ast.parse(path.read_text())) if isinstance(node, ast.Assign)
                   for target in node.targets if isinstance(target, ast.Name) and target.id == "PATCH_SIZE"]
    assert definitions == ["sparse.masking"]


# ---------------------------------------------------------------- the paths users type
DOCUMENTED_MODULES = ("fcmae.pretrain.main", "fcmae.main_pretrain", "fcmae.runtime.launch", "fcmae.tools.env",
                      "fcmae.tools.gpu_check", "fcmae.tools.bench_data", "fcmae.tools.bench_encoder",
                      "finetune.main_finetune", "finetune.convert", "finetune.knn", "finetune.linprobe",
                      "fcmae.data.split", "fcmae.runtime.report")


@pytest.mark.parametrize("module", DOCUMENTED_MODULES)
def test_documented_module_paths_run(module):
    """Each `python -m MODULE` that the docs, launchers and CHANGELOG name is a runnable module."""
    spec = importlib.util.find_spec(module)
    assert spec is not None, module
    if spec.submodule_search_locations is not None:  # a package: run through its __main__
        assert importlib.util.find_spec(f"{module}.__main__") is not None, module


def test_entry_points_name_functions_that_exist():
    setup = (REPO / "setup.py").read_text()
    entries = [line.strip().strip('",') for line in setup.splitlines() if "=" in line and ":main" in line]
    assert len(entries) >= 6, entries
    for entry in entries:
        name, target = entry.split("=")
        module, function = target.split(":")
        assert callable(getattr(importlib.import_module(module), function)), entry


@pytest.mark.slow
def test_the_deprecated_pretraining_path_still_runs(tmp_path):
    """`python -m fcmae.main_pretrain` (the old path, kept as a shim) plans a run like fcmae-pretrain."""
    result = subprocess.run([sys.executable, "-m", "fcmae.main_pretrain", "atto", "demo", "--dry_run",
                             "--output_dir", str(tmp_path / "out")], cwd=REPO, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "FCMAE pre-training plan" in result.stdout and "dry run: nothing was trained" in result.stdout
