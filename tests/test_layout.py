"""The package's shape, read from its source (issue 12): the method imports torch only, the parts
(method, data, runtime, outputs) never import a recipe, no module
reaches into another's private names, and the group trace's file is named in one module only."""

import ast
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "dtvg_scale"


def modules(folder: Path = PACKAGE) -> dict[str, ast.Module]:
    return {str(path.relative_to(PACKAGE.parent)): ast.parse(path.read_text(), str(path))
            for path in sorted(folder.rglob("*.py"))}


def imported_modules(tree: ast.Module) -> set[str]:
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names.add(node.module)
    return names


def test_the_method_imports_torch_and_the_standard_library_only():
    allowed_roots = set(sys.stdlib_module_names) | {"torch"}
    outside = {path: sorted(name for name in imported_modules(tree)
                            if name.split(".")[0] not in allowed_roots and not name.startswith("dtvg_scale.method"))
               for path, tree in modules(PACKAGE / "method").items()}
    assert not {path: names for path, names in outside.items() if names}


def test_no_module_imports_or_reads_a_private_name_of_another():
    found = []
    for path, tree in modules().items():
        package_modules = set()  # local names bound to dtvg_scale modules
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("dtvg_scale"):
                found += [f"{path}: from {node.module} import {a.name}" for a in node.names if a.name.startswith("_")]
                package_modules.update(a.asname or a.name for a in node.names)
            elif isinstance(node, ast.Import):
                package_modules.update(a.asname or a.name for a in node.names if a.name.startswith("dtvg_scale"))
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in package_modules
                    and node.attr.startswith("_") and not node.attr.startswith("__")):
                found.append(f"{path}: {node.value.id}.{node.attr}")
    assert not found


def test_only_the_group_trace_module_names_the_trace_file():
    """Every writer and reader goes through ``dtvg_scale.outputs.group_trace`` (docstrings may name it)."""
    docstrings = set()
    named_in = set()
    for path, tree in modules().items():
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                if node.body and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant):
                    docstrings.add(id(node.body[0].value))
        for node in ast.walk(tree):
            if (isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings
                    and "group_trace.jsonl" in node.value):
                named_in.add(path)
    assert named_in == {"dtvg_scale/outputs/group_trace.py"}


def test_the_parts_do_not_import_the_recipes():
    """method, data, runtime and outputs are parts; only the recipes (and the two path shims) put
    them together, so a part never imports a recipe (a type-only import is fine)."""

    def runtime_imports(tree: ast.Module):
        skipped = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
                skipped.update(id(child) for inner in node.body for child in ast.walk(inner))
        return [node for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and id(node) not in skipped]

    found = [f"{path}: from {node.module} import ..." for path, tree in modules().items()
             if path.split("/")[1] in ("method", "data", "runtime", "outputs", "options.py")
             for node in runtime_imports(tree) if (node.module or "").startswith("dtvg_scale.recipes")]
    assert not found
