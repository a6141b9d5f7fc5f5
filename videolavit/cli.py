"""LightningCLI for the training stages: ``python -m videolavit fit --config experiments/<stage>.yaml``.

Stages (``stages.*``) and the DataModule are chosen in YAML with ``class_path``/``init_args``; a config with
a ``base:`` list is merged with its shared bases first (``videolavit.config_files``). Lightning
behaviours that silently lose work are turned into errors here: ``--ckpt_path last`` that finds no
checkpoint (Lightning would start from scratch, or predict with untrained weights), ``--ckpt_path``
combined with a stage's ``init_from`` (resuming restores the run; ``init_from`` starts a new one from
another stage's export), and a ``predict`` that has no weights to load or no prediction writer to keep
its output (``callbacks.token_dump.TokenDumpWriter``).

``--ckpt_path last`` is resolved here, not by Lightning: the newest ``last*.ckpt`` of the ModelCheckpoint
directories, and when that file is empty or cut short (a kill while it was written) the newest readable
checkpoint in the same directory, with a warning. These user errors, and a run stopped by
``stages.nonfinite_guard`` (non-finite steps in a row, or weights it refuses to export), end in one line on
stderr: exit 2 and 1.
"""

from __future__ import annotations

import os
import sys
import zipfile
from pathlib import Path

import lightning.pytorch as pl
import torch
import yaml
from lightning.pytorch.accelerators import CPUAccelerator
from lightning.pytorch.callbacks import BasePredictionWriter, ModelCheckpoint
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.plugins.io import CheckpointIO
from lightning.pytorch.utilities import rank_zero_warn

from callbacks.atomic_checkpoint_io import AtomicCheckpointIO
from stages.nonfinite_guard import NonFiniteExportError, NonFiniteTrainingError
from videolavit.config_errors import StageConfigError
from videolavit.config_files import ConfigBaseError, has_bases, read_config

CONFIG_OPTIONS = ("--config", "-c")


class ConfigError(ValueError):
    """A training configuration that would silently do the wrong thing."""


class NoValidCheckpointError(ConfigError):
    """``--ckpt_path last`` found checkpoints, but none of them can be read."""


def checkpoint_problem(path: Path) -> str | None:
    """Why ``path`` cannot be a checkpoint to resume from (None: it looks whole). Cheap: reads the zip
    directory of a ``torch.save`` file, not its tensors; a distributed checkpoint (a directory) needs its
    ``.metadata``, which is written last."""
    if path.is_dir():
        return None if (path / ".metadata").is_file() else "a checkpoint directory without .metadata"
    try:
        size = path.stat().st_size
    except OSError as exc:
        return f"unreadable ({exc.strerror})"
    if size == 0:
        return "empty"
    try:
        with zipfile.ZipFile(path) as archive:
            members = archive.infolist()
    except (zipfile.BadZipFile, OSError, ValueError):
        return f"not a complete torch checkpoint ({size} bytes; truncated?)"
    if not any(m.filename.endswith("/data.pkl") or m.filename == "data.pkl" for m in members):
        return "a zip file without data.pkl: not a torch checkpoint"
    if any(m.header_offset + m.compress_size > size for m in members):
        return f"truncated ({size} bytes)"
    return None


def _newest_first(paths: list[Path]) -> list[Path]:
    return sorted(paths, key=lambda p: (p.stat().st_mtime, p.name), reverse=True)


def resolve_last_checkpoint(dirs: list[Path]) -> Path:
    """The checkpoint ``--ckpt_path last`` resumes from: the newest ``last*.ckpt`` in ``dirs`` if it is whole,
    else (with a warning) the newest whole checkpoint of the same directory."""
    lasts = _newest_first([p for d in dirs if d.is_dir() for p in d.glob("last*.ckpt")])
    if not lasts:
        raise ConfigError(f"--ckpt_path last: no last*.ckpt in {[str(d) for d in dirs]}; drop --ckpt_path to start "
                          "a new run, or set --ckpt_path to a checkpoint file")
    last = lasts[0]
    problem = checkpoint_problem(last)
    if problem is None:
        return last
    candidates = _newest_first([p for p in last.parent.glob("*.ckpt") if p != last])
    rejected = [f"{last.name} ({problem})"]
    for candidate in candidates:
        reason = checkpoint_problem(candidate)
        if reason is None:
            rank_zero_warn(f"--ckpt_path last: {last} is {problem}; resuming from {candidate}, the newest readable "
                           "checkpoint in that directory (the steps after it are trained again)")
            return candidate
        rejected.append(f"{candidate.name} ({reason})")
    raise NoValidCheckpointError(f"--ckpt_path last: no readable checkpoint in {last.parent}: {'; '.join(rejected)}. "
                                 "Set --ckpt_path to a good checkpoint file, or drop it to start a new run")


def merge_config_bases(argv: list[str]) -> list[str]:
    """``argv`` with every ``--config FILE`` whose YAML has a ``base:`` replaced by the merged settings (as the
    YAML text jsonargparse also accepts there), so one file written as a delta of shared bases runs as it reads
    (``videolavit.config_files``). Other arguments, and configs without ``base:``, pass unchanged."""
    merged = []
    take_next = False
    for arg in argv:
        if take_next:
            take_next = False
            merged.append(yaml.safe_dump(read_config(arg), sort_keys=False) if has_bases(arg) else arg)
            continue
        option, equals, value = arg.partition("=")
        if option in CONFIG_OPTIONS and equals:
            merged.append(f"{option}={yaml.safe_dump(read_config(value), sort_keys=False)}" if has_bases(value) else arg)
            continue
        take_next = arg in CONFIG_OPTIONS
        merged.append(arg)
    return merged


class VideoLavitCLI(LightningCLI):
    def parse_arguments(self, parser, args) -> None:
        """Configs with a ``base:`` list reach the parser merged (``merge_config_bases``)."""
        if args is not None and not isinstance(args, (list, tuple)):
            return super().parse_arguments(parser, args)
        given = list(sys.argv[1:] if args is None else args)
        merged = merge_config_bases(given)
        if merged == given:
            return super().parse_arguments(parser, args)
        self.config = parser.parse_args(merged)

    def before_instantiate_classes(self) -> None:
        torch.set_float32_matmul_precision("high")

    def instantiate_trainer(self, **kwargs):
        """Checkpoints go through ``AtomicCheckpointIO`` (nothing left in $TMPDIR, normal permissions) unless the
        config names its own CheckpointIO plugin."""
        if "plugins" not in kwargs:
            plugins = (self._get(self.config_init, "trainer", default={}) or {}).get("plugins")
            plugins = [] if plugins is None else list(plugins) if isinstance(plugins, (list, tuple)) else [plugins]
            if not any(isinstance(p, CheckpointIO) for p in plugins):
                kwargs["plugins"] = [*plugins, AtomicCheckpointIO()]
        return super().instantiate_trainer(**kwargs)

    def _check_resume(self) -> None:
        config = self.config[self.subcommand]
        ckpt_path = config.get("ckpt_path")
        if not ckpt_path:
            return
        init_from = getattr(self.model, "init_from", None)
        if init_from:
            raise ConfigError(
                f"both --ckpt_path={ckpt_path} and model.init_from={init_from} are set: --ckpt_path resumes this "
                "stage's run (weights, optimizer, step) while init_from starts a new run from another stage's "
                "export. To resume, add --model.init_from null.")
        if ckpt_path == "last":
            dirs = [Path(cb.dirpath) for cb in self.trainer.callbacks
                    if isinstance(cb, ModelCheckpoint) and cb.dirpath is not None]
            if not dirs:
                raise ConfigError("--ckpt_path last needs a ModelCheckpoint with a fixed dirpath (with the default "
                                  "log dir every run is a new version and Lightning would start from scratch): set "
                                  "trainer.callbacks' ModelCheckpoint dirpath")
            # What the trainer call receives (``config_init``), so Lightning does not pick the broken file itself.
            self.config_init[self.subcommand]["ckpt_path"] = str(resolve_last_checkpoint(dirs))

    def _cap_cpu_threads(self) -> None:
        """On CPU, one intra-op thread per free core. Training processes plus DataLoader workers that
        oversubscribe the cores make OpenMP threads spin against each other: measured 10-80x slower
        steps on 2 cores with 2 workers."""
        if not isinstance(self.trainer.accelerator, CPUAccelerator):
            return
        workers = int(getattr(self.datamodule, "num_workers", 0) or 0)
        per_process = (os.cpu_count() or 1) // max(1, self.trainer.num_devices)
        threads = max(1, per_process - workers)
        if torch.get_num_threads() > threads:
            torch.set_num_threads(threads)

    def before_fit(self) -> None:
        self._cap_cpu_threads()
        self._check_resume()

    def before_validate(self) -> None:
        self._cap_cpu_threads()
        self._check_resume()

    def before_test(self) -> None:
        self._cap_cpu_threads()
        self._check_resume()

    def before_predict(self) -> None:
        self._cap_cpu_threads()
        self._check_resume()
        if not self.config["predict"].get("ckpt_path") and not getattr(self.model, "init_from", None):
            raise ConfigError("predict needs trained weights: pass --ckpt_path (a checkpoint, or 'last') or "
                              "--model.init_from EXPORT_DIR; otherwise it would predict with untrained weights")
        if not any(isinstance(cb, BasePredictionWriter) for cb in self.trainer.callbacks):
            raise ConfigError("predict without a prediction writer discards its output; add e.g. "
                              "--trainer.callbacks+=callbacks.token_dump.TokenDumpWriter "
                              "--trainer.callbacks.output_dir=DIR")

    def predict(self, return_predictions: bool | None = None, **kwargs):
        """The writer streams predictions to disk; keeping them all in memory too grows with the corpus."""
        return self.trainer.predict(return_predictions=bool(return_predictions), **kwargs)


def stage_config_error(error: BaseException) -> StageConfigError | None:
    """The ``StageConfigError`` in ``error``'s chain of causes, if any."""
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, StageConfigError):
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


def run_lightning_cli(argv: list[str]) -> VideoLavitCLI:
    """Run a trainer command. A ``ConfigError`` (a user error) prints one line and exits 2, like an argument
    error; a run stopped by non-finite steps or weights (``stages.nonfinite_guard``) prints one line and exits 1."""
    try:
        # From the command line LightningCLI reads sys.argv itself (and warns when it is also given as args).
        return VideoLavitCLI(
            model_class=pl.LightningModule,
            subclass_mode_model=True,
            datamodule_class=pl.LightningDataModule,
            subclass_mode_data=True,
            save_config_kwargs={"overwrite": True},
            args=None if argv == sys.argv[1:] else argv,
            auto_configure_optimizers=False,
        )
    except (ConfigError, ConfigBaseError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    except ValueError as exc:  # LightningCLI wraps what a stage's constructor raises in its own errors
        cause = stage_config_error(exc)
        if cause is None:
            raise
        print(f"error: {cause}", file=sys.stderr)
        raise SystemExit(2) from None
    except (NonFiniteTrainingError, NonFiniteExportError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(1) from None
