"""Module docstrings say why in a few lines: one longer than MAX_LINES is a design note that belongs in
docs/ (where it is kept true) or a measurement that belongs in benchmark output, not in the code."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("videolavit", "stages", "datamodules", "callbacks")
MAX_LINES = 15
# Longer today, to be cut to MAX_LINES (their design notes to docs/design.md): each may only shrink, and a
# module leaves this list once it fits.
LONGER_TODAY = {
    "videolavit/commands/chat.py": 21,
    "videolavit/inference/video_chat.py": 23,
    "videolavit/llm/conversation.py": 34,
    "videolavit/llm/keyframe_features.py": 18,
    "videolavit/models/video_unet.py": 29,
    "videolavit/release/importer.py": 17,
}


def docstring_lines(path: Path) -> int:
    doc = ast.get_docstring(ast.parse(path.read_text()), clean=True)
    return 0 if doc is None else len(doc.strip().splitlines())


def long_docstrings() -> dict[str, int]:
    return {str(p.relative_to(REPO)): n for package in PACKAGES for p in sorted((REPO / package).rglob("*.py"))
            if (n := docstring_lines(p)) > MAX_LINES}


def test_docstring_lines_counts_the_docstring_only(tmp_path):
    module = tmp_path / "m.py"
    module.write_text('"""One.\n\nTwo\nthree.\n"""\n\nX = 1\n"""not a docstring"""\n')
    assert docstring_lines(module) == 4
    module.write_text("X = 1\n")
    assert docstring_lines(module) == 0


def test_module_docstrings_are_short():
    grown = {name: n for name, n in long_docstrings().items() if n > LONGER_TODAY.get(name, MAX_LINES)}
    assert grown == {}, f"module docstrings over {MAX_LINES} lines (or longer than recorded): {grown}"
    fitting = sorted(name for name in LONGER_TODAY if name not in long_docstrings())
    assert fitting == [], f"now {MAX_LINES} lines or fewer: remove them from LONGER_TODAY: {fitting}"
