"""The import structure, read from the source with `ast` (nothing is imported).

`qrpo` is the one import root. Its parts import downwards only: common <- kernels <- {train,
generate, evaluate} <- slurm <- pipelines. train, generate and evaluate share what they all need
through qrpo.common and qrpo.kernels and never import each other; slurm imports what it launches;
qrpo.pipelines (the demo, frontiers) may import everything. No module imports itself back through others. Imports under
`if __name__ == "__main__":` are left out: they run only when that module is the program.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ALLOWED = {
    "common": {"common"},
    "kernels": {"common", "kernels"},
    "train": {"common", "kernels", "train"},
    "generate": {"common", "kernels", "generate"},
    "evaluate": {"common", "kernels", "evaluate"},
    "slurm": {"common", "kernels", "train", "generate", "evaluate", "slurm"},
    "pipelines": {"common", "kernels", "train", "generate", "evaluate", "slurm", "pipelines"},
}


def _part(module: str) -> str:
    """'qrpo.train.losses.dpo' -> 'train'."""
    return module.split(".")[1]


def _modules() -> dict[str, Path]:
    out = {}
    for package in ALLOWED:
        for path in sorted((ROOT / "qrpo" / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            out[name] = path
    return out


def _is_main_guard(node: ast.AST) -> bool:
    return (
        isinstance(node, ast.If)
        and isinstance(node.test, ast.Compare)
        and isinstance(node.test.left, ast.Name)
        and node.test.left.id == "__name__"
    )


def _imports(path: Path, name: str, modules: dict[str, Path]) -> set[str]:
    """Repository modules that `name` imports, at any depth of its code but a main guard."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if _is_main_guard(node):
            return
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                submodule = f"{base}.{alias.name}"
                found.add(submodule if submodule in modules else base)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text(), str(path)))
    return {m for m in found if m in modules and m != name}


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(path, name, modules) for name, path in modules.items()}


def test_packages_import_only_downwards():
    wrong = [
        f"{name} imports {target}"
        for name, targets in _graph().items()
        for target in sorted(targets)
        if _part(target) not in ALLOWED[_part(name)]
    ]
    assert not wrong, "imports against the package order:\n" + "\n".join(wrong)


def test_no_import_circles():
    graph = _graph()
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    circles: list[list[str]] = []

    def strongly_connected(v: str) -> None:  # Tarjan's algorithm
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                strongly_connected(w)
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

    for v in graph:
        if v not in index:
            strongly_connected(v)
    assert not circles, f"import circles: {circles}"


def test_the_checks_see_imports_inside_functions_and_relative_ones(tmp_path):
    """The reader itself: a lazy import inside a function counts, a main guard does not."""
    source = tmp_path / "mod.py"
    source.write_text(
        "def f():\n    from qrpo.train.train import train\n"
        "from . import data\n"
        "if __name__ == '__main__':\n    import qrpo.generate.pipeline\n"
    )
    modules = {
        "qrpo.train.train": source,
        "qrpo.train.data": source,
        "qrpo.generate.pipeline": source,
    }
    assert _imports(source, "qrpo.train.mod", modules) == {"qrpo.train.train", "qrpo.train.data"}


def test_every_module_belongs_to_a_part():
    """A new first-level package under qrpo/ must be placed in the order above."""
    parts = {p.name for p in (ROOT / "qrpo").iterdir() if (p / "__init__.py").exists()}
    assert parts == set(ALLOWED)
    loose = sorted(p.name for p in (ROOT / "qrpo").glob("*.py") if p.name != "__init__.py")
    assert not loose, f"modules directly under qrpo/ belong in one of its parts: {loose}"


def test_qrpo_is_the_only_top_level_package():
    """Any other importable name at the repository root can shadow, or be shadowed by, an installed
    distribution (our old top-level `kernels/` hid Hugging Face's `kernels`, which transformers
    imports at model load)."""
    importable = sorted(
        p.name
        for p in ROOT.iterdir()
        if not p.name.startswith(".")
        and ((p.is_dir() and (p / "__init__.py").exists()) or p.suffix == ".py")
    )
    assert importable == ["qrpo"]
