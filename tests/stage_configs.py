"""The tiny stage configs the tests run through the CLI: ``tests/conf/<stage>.yaml`` (a delta of
``tests/conf/base.yaml``), with the paths of one test filled in."""

from __future__ import annotations

from pathlib import Path

import yaml

from videolavit.config_files import merge_config, read_config

CONF = Path(__file__).resolve().parent / "conf"
CHECKPOINT = "lightning.pytorch.callbacks.ModelCheckpoint"


def stage_conf(stage: str) -> dict:
    """``tests/conf/<stage>.yaml`` with its base applied (no paths yet)."""
    return read_config(CONF / f"{stage}.yaml")


def write_stage_config(stage: str, root: Path, shards: Path, delta: dict | None = None,
                       trainer: dict | None = None, callbacks: list[dict] | None = None) -> Path:
    """``root/config.yaml``: the stage's test config logging, checkpointing and exporting under ``root`` and
    reading ``shards`` (train and val), then ``delta`` merged over it (``videolavit.config_files``), the
    ``trainer`` values set and ``callbacks`` appended after the config's own."""
    config = merge_config(stage_conf(stage), {
        "trainer": {"logger": {"init_args": {"save_dir": str(root / "logs")}},
                    "callbacks": [{"class_path": CHECKPOINT, "init_args": {"dirpath": str(root / "checkpoints")}}]},
        "model": {"init_args": {"export_dir": str(root / "export")}},
        "data": {"init_args": {"train_shards": str(shards), "val_shards": str(shards)}},
    })
    config = merge_config(config, delta or {})
    config["trainer"].update(trainer or {})
    config["trainer"]["callbacks"] += list(callbacks or [])
    root.mkdir(parents=True, exist_ok=True)
    path = root / "config.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path
