"""The import rules of docs/design.md §2, checked on the source: layers run one way, nothing imports in a
circle, and no module takes an underscore name out of another project file.

The source is read with ``ast`` (nothing is imported), and every import statement counts, those inside
functions too: a lazy import still ties the two modules together. The checker is first run on a small
hand-made tree with one offence of each kind, so a checker that finds nothing cannot pass for a clean repo.
"""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LIBRARY = "videolavit"
APPLICATION = ("datamodules", "stages", "callbacks")
ENTRY_POINT = ("videolavit.cli", "videolavit.__main__", "videolavit.commands")  # the top layer: may import anything
PACKAGES = (LIBRARY, *APPLICATION)


@dataclasses.dataclass
class ImportGraph:
    edges: dict[str, set[str]]  # module -> project modules it imports
    taken_names: list[tuple[str, str, str]]  # (importer, source module, name) for every ``from m import name``


def module_files(root: Path, packages: tuple[str, ...] = PACKAGES) -> dict[str, Path]:
    """Dotted module name -> file, for every ``.py`` under the given top-level packages."""
    found = {}
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


def _deepest_known(dotted: str, known: dict[str, Path]) -> str | None:
    parts = dotted.split(".")
    for end in range(len(parts), 0, -1):
        if ".".join(parts[:end]) in known:
            return ".".join(parts[:end])
    return None


def _absolute_base(module: str, node: ast.ImportFrom, known: dict[str, Path]) -> str:
    """The module a ``from ... import`` reads from, with relative levels resolved against ``module``."""
    if not node.level:
        return node.module or ""
    package = module.split(".")
    if known[module].name != "__init__.py":  # a plain module's level 1 is its own package
        package = package[:-1]
    package = package[: len(package) - (node.level - 1)]
    return ".".join(package + ([node.module] if node.module else []))


def read_import_graph(root: Path, packages: tuple[str, ...] = PACKAGES) -> ImportGraph:
    known = module_files(root, packages)
    graph = ImportGraph(edges={name: set() for name in known}, taken_names=[])
    for module, path in known.items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [t for alias in node.names if (t := _deepest_known(alias.name, known))]
            elif isinstance(node, ast.ImportFrom):
                base = _absolute_base(module, node, known)
                for alias in node.names:
                    submodule = f"{base}.{alias.name}" if base else alias.name
                    if submodule in known:  # ``from package import module``
                        targets.append(submodule)
                    elif (source := _deepest_known(base, known)) is not None:
                        targets.append(source)
                        graph.taken_names.append((module, source, alias.name))
            graph.edges[module].update(t for t in targets if t != module)
    return graph


def _is_ancestor(package: str, module: str) -> bool:
    return module.startswith(package + ".")


def find_cycles(graph: ImportGraph) -> list[list[str]]:
    """One closed path per cycle found by depth-first search. An edge from a module to a package that
    contains it is not followed: Python has imported that package before the module in any case."""
    state: dict[str, str] = {}  # "open" while on the current path, "done" after
    path: list[str] = []
    cycles: list[list[str]] = []

    def visit(module: str) -> None:
        state[module] = "open"
        path.append(module)
        for target in sorted(graph.edges[module]):
            if _is_ancestor(target, module):
                continue
            if state.get(target) == "open":
                cycles.append(path[path.index(target):] + [target])
            elif target not in state:
                visit(target)
        path.pop()
        state[module] = "done"

    for module in sorted(graph.edges):
        if module not in state:
            visit(module)
    return cycles


def find_upward_imports(graph: ImportGraph) -> list[str]:
    """Library modules (outside the entry point) that import from the Lightning application packages."""
    return [
        f"{module} imports {target}"
        for module, targets in sorted(graph.edges.items())
        if (module == LIBRARY or module.startswith(LIBRARY + "."))
        and not any(module == top or module.startswith(top + ".") for top in ENTRY_POINT)
        for target in sorted(targets)
        if any(target == app or target.startswith(app + ".") for app in APPLICATION)
    ]


def find_private_imports(graph: ImportGraph) -> list[str]:
    """``from other_module import _name``: another file's underscore name, which it may change at will."""
    return [
        f"{module} takes {name} from {source}"
        for module, source, name in graph.taken_names
        if name.startswith("_") and not (name.startswith("__") and name.endswith("__"))
    ]


def _report(kind: str, offences: list) -> str:
    lines = [" -> ".join(o) if isinstance(o, list) else o for o in offences]
    for line in lines:
        print(f"{kind}: {line}")
    return f"{len(lines)} {kind}(s):\n" + "\n".join(lines)


@pytest.fixture(scope="module")
def repo_graph() -> ImportGraph:
    return read_import_graph(REPO)


def test_the_checker_finds_each_kind_of_offence(tmp_path):
    files = {
        "videolavit/__init__.py": "",
        "videolavit/a.py": "from videolavit import b\n",
        "videolavit/b.py": "def later():\n    from . import a\n",  # a lazy, relative import closes the cycle
        "videolavit/c.py": "def later():\n    import stages.train\n",  # a lazy upward import
        "videolavit/d.py": "from videolavit.a import _helper, __version__\n",  # one private name, one dunder
        "videolavit/commands/__init__.py": "",
        "videolavit/commands/run.py": "from stages.train import fit\n",  # the entry point may import anything
        "stages/__init__.py": "",
        "stages/train.py": "from videolavit.a import something\n",
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    graph = read_import_graph(tmp_path, packages=("videolavit", "stages"))

    assert find_cycles(graph) == [["videolavit.a", "videolavit.b", "videolavit.a"]]
    assert find_upward_imports(graph) == ["videolavit.c imports stages.train"]
    assert find_private_imports(graph) == ["videolavit.d takes _helper from videolavit.a"]


def test_the_repository_packages_are_all_read(repo_graph):
    modules = set(repo_graph.edges)
    assert {"videolavit.cli", "videolavit.synth.moving_shapes", "videolavit.synth.stills"} <= modules
    assert all(any(m == p or m.startswith(p + ".") for m in modules) for p in PACKAGES)
    assert "videolavit.synth.shape_render" in repo_graph.edges["videolavit.synth.stills"]


def test_no_import_cycles(repo_graph):
    cycles = find_cycles(repo_graph)
    assert not cycles, _report("cycle", cycles)


def test_the_library_never_imports_the_application(repo_graph):
    upward = find_upward_imports(repo_graph)
    assert not upward, _report("upward import", upward)


def test_no_underscore_names_imported_from_other_files(repo_graph):
    private = find_private_imports(repo_graph)
    assert not private, _report("private import", private)
