"""The stage configs are found from a checkout and from an installed package (``demo`` reads the tiny ones),
and pyproject ships every config a checkout has."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from videolavit.commands.demo import STAGES
from videolavit.experiment_configs import (
    ExperimentConfigsNotFoundError,
    experiments_dir,
    installed_experiments_dir,
    tiny_config,
)

REPO = Path(__file__).resolve().parents[1]


def _fake_install(root: Path, name: str) -> Path:
    """A distribution ``name`` in ``root/site`` whose RECORD lists configs under ``root/share/videolavit``."""
    site = root / "site"
    dist_info = site / f"{name.replace('-', '_')}-0.1.dist-info"
    dist_info.mkdir(parents=True)
    (dist_info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1\n")
    configs = ["stage2_pretrain.yaml", "tiny/pretrain.yaml"]
    for config in configs:
        path = root / "share" / "videolavit" / "experiments" / config
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("trainer: {}\n")
    record = [f"../share/videolavit/experiments/{c},," for c in configs] + [f"{dist_info.name}/METADATA,,"]
    (dist_info / "RECORD").write_text("\n".join(record) + "\n")
    return site


def test_a_checkout_uses_its_own_experiments_directory():
    assert experiments_dir() == REPO / "experiments"
    for stage in STAGES:  # every config the demo runs exists where it is looked up
        assert stage.config == REPO / "experiments" / "tiny" / f"{stage.name}.yaml"
        assert stage.config.is_file(), stage.config


def test_an_installed_package_finds_the_configs_its_record_lists(tmp_path, monkeypatch):
    site = _fake_install(tmp_path, "fake-videolavit")
    monkeypatch.syspath_prepend(str(site))
    expected = (tmp_path / "share" / "videolavit" / "experiments").resolve()

    assert installed_experiments_dir("fake-videolavit") == expected
    assert experiments_dir(tmp_path / "no_checkout", "fake-videolavit") == expected
    assert tiny_config("pretrain", tmp_path / "no_checkout", "fake-videolavit") == expected / "tiny" / "pretrain.yaml"
    # A checkout, when there is one, wins over the installed copy.
    assert experiments_dir(REPO / "experiments", "fake-videolavit") == REPO / "experiments"


def test_no_checkout_and_no_installed_configs_is_a_named_error(tmp_path):
    assert installed_experiments_dir("no-such-videolavit-distribution") is None
    with pytest.raises(ExperimentConfigsNotFoundError, match="reinstall videolavit"):
        experiments_dir(tmp_path / "no_checkout", "no-such-videolavit-distribution")


def test_pyproject_ships_every_config_of_the_checkout():
    tomllib = pytest.importorskip("tomllib")
    data_files = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["data-files"]
    shipped = {
        f"{target}/{path.name}"
        for target, patterns in data_files.items()
        for pattern in patterns
        for path in REPO.glob(pattern)
    }
    checkout = {f"share/videolavit/{p.relative_to(REPO).as_posix()}" for p in (REPO / "experiments").rglob("*.yaml")}
    assert checkout and shipped == checkout


@pytest.mark.slow
def test_a_wheel_installed_elsewhere_finds_its_configs(tmp_path):
    source = tmp_path / "source"
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info", "build")
    for name in ("videolavit", "stages", "datamodules", "callbacks", "experiments"):
        shutil.copytree(REPO / name, source / name, ignore=ignore)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    prefix = tmp_path / "prefix"
    install = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index", "--quiet",
         "--prefix", str(prefix), str(source)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert install.returncode == 0, install.stdout[-2000:] + install.stderr[-2000:]
    site = next(prefix.glob("lib/python*/site-packages"))
    probe = subprocess.run(
        [sys.executable, "-c", "import videolavit, videolavit.experiment_configs as c;"
         " print(videolavit.__file__); print(c.tiny_config('pretrain'))"],
        cwd=tmp_path, env={"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin"}, capture_output=True, text=True,
        timeout=120,
    )  # fmt: skip
    assert probe.returncode == 0, probe.stderr[-2000:]
    module_file, config = probe.stdout.split()
    assert Path(module_file).is_relative_to(site)  # the installed copy ran, not the checkout
    assert Path(config) == (prefix / "share" / "videolavit" / "experiments" / "tiny" / "pretrain.yaml").resolve()
    assert Path(config).read_text() == (REPO / "experiments" / "tiny" / "pretrain.yaml").read_text()
