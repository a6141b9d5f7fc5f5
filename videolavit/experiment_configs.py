"""Where the stage configs (``experiments/``, with the tiny ones under ``experiments/tiny``) are found.

``demo`` and the users it shows run ``fit --config experiments/tiny/<stage>.yaml``, so the configs must be
reachable wherever videolavit runs. In a checkout they sit beside the package; a wheel installs them as data
files under ``share/videolavit/experiments`` (pyproject ``[tool.setuptools.data-files]``), which are found
through the installed distribution's own file list, so every install scheme (venv, ``--user``, ``--prefix``)
works without guessing prefixes. The checkout wins: an editable install or a source tree runs its own configs.
"""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

CHECKOUT_EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"
INSTALLED_PARTS = ("share", "videolavit", "experiments")  # where pyproject's data-files put them
DISTRIBUTION = "videolavit"


class ExperimentConfigsNotFoundError(FileNotFoundError):
    """Neither a checkout's ``experiments/`` nor an installed package's copy of it exists."""


def _holds_configs(path: Path) -> bool:
    return (path / "tiny").is_dir() and any(path.glob("*.yaml"))


def installed_experiments_dir(distribution: str = DISTRIBUTION) -> Path | None:
    """The ``share/videolavit/experiments`` directory the installed ``distribution`` recorded, if any."""
    try:
        files = importlib.metadata.distribution(distribution).files or []
    except importlib.metadata.PackageNotFoundError:
        return None
    for file in files:  # a top-level config: its parent directory is the experiments directory
        if file.suffix == ".yaml" and tuple(file.parts[-4:-1]) == INSTALLED_PARTS:
            directory = Path(file.locate()).resolve().parent
            if _holds_configs(directory):
                return directory
    return None


def experiments_dir(checkout: Path = CHECKOUT_EXPERIMENTS, distribution: str = DISTRIBUTION) -> Path:
    """The checkout's ``experiments/`` if there is one, else the installed package's copy."""
    if _holds_configs(checkout):
        return checkout
    installed = installed_experiments_dir(distribution)
    if installed is not None:
        return installed
    raise ExperimentConfigsNotFoundError(
        f"no stage configs: {checkout} does not exist (not a checkout) and the installed {distribution!r} package"
        f" records no {'/'.join(INSTALLED_PARTS)}; reinstall videolavit (pip install .) or run from a checkout"
    )


def tiny_config(stage: str, checkout: Path = CHECKOUT_EXPERIMENTS, distribution: str = DISTRIBUTION) -> Path:
    """``experiments/tiny/<stage>.yaml``, wherever the configs are."""
    return experiments_dir(checkout, distribution) / "tiny" / f"{stage}.yaml"
