"""Write ``tests/data/effective_configs/<config>.yaml``: what ``fit --config <config> --print_config`` prints for
every experiment config, the snapshots ``tests/test_experiment_configs.py`` compares against (so restructuring
the YAML files cannot change a run). Rerun after changing a config's values on purpose:

    python tests/effective_config_snapshots.py
"""

from __future__ import annotations

import contextlib
import io
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
EXPERIMENTS = REPO / "experiments"
SNAPSHOTS = REPO / "tests" / "data" / "effective_configs"


def experiment_configs() -> list[Path]:
    """Every runnable stage config (the shared base files under ``base/`` are not runs)."""
    return sorted(EXPERIMENTS.glob("*.yaml")) + sorted(EXPERIMENTS.glob("tiny/*.yaml"))


def snapshot_path(config: Path) -> Path:
    return SNAPSHOTS / str(config.relative_to(EXPERIMENTS)).replace("/", "__")


def printed_config(config: Path) -> str:
    """``fit --config CONFIG --print_config``'s output, in this process."""
    from videolavit.__main__ import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        try:
            main(["fit", "--config", str(config), "--print_config"])
        except SystemExit as exit_info:
            if exit_info.code not in (0, None):
                raise
    return out.getvalue()


def main() -> int:
    SNAPSHOTS.mkdir(parents=True, exist_ok=True)
    for config in experiment_configs():
        snapshot_path(config).write_text(printed_config(config))
        print(snapshot_path(config).relative_to(REPO))
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    sys.exit(main())
