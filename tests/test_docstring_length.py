"""Module docstrings say why in a few lines: one longer than MAX_LINES is a design note that belongs in
docs/ (where it is kept true) or a measurement that belongs in benchmark output, not in the code."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("videolavit", "stages", "datamodules", "callbacks")
MAX_LINES = 15


def docstring_lines(path: Path) -> int:
    doc = ast.get_docstring(ast.parse(path.read_text()), clean=True)
    return 0 if doc is None else len(doc.strip().splitlines())


def long_docstrings(root: Path = REPO) -> dict[str, int]:
    return {str(p.relative_to(root)): n for package in PACKAGES for p in sorted((root / package).rglob("*.py"))
            if (n := docstring_lines(p)) > MAX_LINES}


def test_docstring_lines_counts_the_docstring_only(tmp_path):
    module = tmp_path / "m.py"
    module.write_text('"""One.\n\nTwo\nthree.\n"""\n\nX = 1\n"""not a docstring"""\n')
    assert docstring_lines(module) == 4
    module.write_text("X = 1\n")
    assert docstring_lines(module) == 0


def test_long_docstrings_names_the_modules_over_the_limit(tmp_path):
    def module(n: int) -> str:
        return '"""' + "\n".join(f"line {i}" for i in range(n)) + '\n"""\n'

    (tmp_path / "stages").mkdir()
    (tmp_path / "stages" / "fits.py").write_text(module(MAX_LINES))
    (tmp_path / "stages" / "long.py").write_text(module(MAX_LINES + 1))
    assert long_docstrings(tmp_path) == {"stages/long.py": MAX_LINES + 1}


def test_module_docstrings_are_short():
    long = long_docstrings()
    assert long == {}, (f"module docstrings over {MAX_LINES} lines: say why in a few lines, move design notes to "
                        f"docs/design.md and measured figures to docs/measurements.md: {long}")
