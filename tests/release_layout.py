"""The public release's parameter layout (tests/data, a copy of shared/reference), parsed for tests."""

from __future__ import annotations

import re
from pathlib import Path

LAYOUT_FILE = Path(__file__).parent / "data" / "release_state_dict_layout.txt"


def release_layout(section: str) -> dict[str, tuple[int, ...]]:
    """Name -> shape of one section, with the "N blocks" comments expanded to every block index."""
    lines = LAYOUT_FILE.read_text().split(f"[{section}]", 1)[1].split("\n[", 1)[0].splitlines()[1:]
    shapes, counts = {}, {}
    for line in lines:
        if m := re.match(r"# (\S+)\.N: (\d+) blocks", line):
            counts[m.group(1)] = int(m.group(2))
        elif m := re.match(r"(\S+): ([\dx]+)$", line):
            shapes[m.group(1)] = tuple(int(n) for n in m.group(2).split("x"))
    for prefix, count in counts.items():
        for name in [n for n in shapes if n.startswith(prefix + ".0.")]:
            for i in range(1, count):
                shapes[name.replace(prefix + ".0.", f"{prefix}.{i}.", 1)] = shapes[name]
    return shapes
