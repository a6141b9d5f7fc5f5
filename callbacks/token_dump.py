"""Token dump: stream a tokenizer stage's ``predict`` output to disk as JSONL, for inspection and debugging.

Training does not read these dumps: the LLM stages read token shards written by ``python -m videolavit tokenize``
(``datamodules.tokenize_shards``: WebDataset tars, streamed, fingerprinted). A dump is a quick look at what a
tokenizer checkpoint makes of a corpus (ids per clip, one JSON line each), e.g. to compare two checkpoints.
The commands and the file layout are in ``TokenDumpWriter``'s docstring. The manifest is written last, so a
dump without it is incomplete, and ``videolavit.token_dump.read_token_dump`` refuses it rather than return part of a corpus.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from lightning.pytorch.callbacks import BasePredictionWriter

from videolavit.token_dump import FORMAT, FORMAT_VERSION, manifest_path, rank_file

class TokenDumpWriter(BasePredictionWriter):
    """Write ``predict_step`` outputs ``{"key", "clip_start", "ids"}`` as JSONL, one file per rank.

    Dump the motion tokens of a trained stage 1a run (the val shards, or the train shards when the config
    has none; override ``--data.init_args.val_shards`` to dump another corpus)::

        python -m videolavit predict --config experiments/stage1_motion_tokenizer.yaml \\
            --ckpt_path runs/stage1_motion_tokenizer/checkpoints/last.ckpt \\
            --trainer.callbacks+=callbacks.token_dump.TokenDumpWriter \\
            --trainer.callbacks.output_dir=/data/tokens/webvid

    On a laptop, after ``python -m videolavit demo`` (or a tiny ``fit``)::

        python -m videolavit predict --config experiments/tiny/motion_tokenizer.yaml --ckpt_path last \\
            --trainer.callbacks+=callbacks.token_dump.TokenDumpWriter --trainer.callbacks.output_dir=runs/tiny/tokens

    ``--ckpt_path last`` resolves in the config's checkpoint dirpath; ``--model.init_from EXPORT_DIR``
    instead of ``--ckpt_path`` dumps with a stage export. The CLI refuses a ``predict`` without weights or
    without a prediction writer, and does not also keep the predictions in memory. Every rank writes its own
    ``{name}_tokens.rank{R}.jsonl``, one line per clip::

        {"key": "<video key>", "clip_start": 12, "motion_ids": [17, 803, ...]}

    and, once all ranks have finished, rank 0 writes ``{name}_tokens.json`` listing the rank files, the
    number of clips written, the token count and the codebook size. The JSON is written last, so a dump
    without it is incomplete; ``read_token_dump`` refuses such a directory, and one whose files hold a
    different number of clips.

    Args:
        output_dir: directory of the dump (created; a previous dump of the same ``name`` is replaced).
        name: token kind; sets the file names and the ids field (``motion`` -> ``motion_ids``).
    """

    def __init__(self, output_dir: str, name: str = "motion"):
        super().__init__(write_interval="batch")
        self.output_dir, self.name = Path(output_dir), name
        self._file = None
        self._count = 0

    def setup(self, trainer, pl_module, stage: str) -> None:
        if stage != "predict":
            return
        self.output_dir.mkdir(parents=True, exist_ok=True)
        if trainer.is_global_zero:
            manifest_path(self.output_dir, self.name).unlink(missing_ok=True)
        # written under a temporary name, renamed when this rank has finished
        self._path = self.output_dir / rank_file(self.name, trainer.global_rank)
        self._partial = self._path.with_name(self._path.name + ".partial")
        self._file = open(self._partial, "w")
        self._count = 0

    def write_on_batch_end(self, trainer, pl_module, prediction: dict, batch_indices, batch, batch_idx: int,
                           dataloader_idx: int) -> None:
        ids = prediction["ids"].tolist()
        starts = prediction["clip_start"].tolist()
        field = f"{self.name}_ids"
        for key, start, row in zip(prediction["key"], starts, ids):
            self._file.write(json.dumps({"key": key, "clip_start": int(start), field: row}) + "\n")
        self._count += len(ids)

    def on_predict_end(self, trainer, pl_module) -> None:
        self._file.close()
        self._file = None
        self._partial.replace(self._path)
        # a collective: when it returns, every rank has renamed its finished file
        clips = trainer.strategy.reduce(torch.tensor(self._count, device=pl_module.device), reduce_op="sum")
        if trainer.is_global_zero:
            model = getattr(pl_module, "model", None)
            config = getattr(model, "config", None)
            grid = getattr(model, "token_grid", None)
            manifest = {
                "format": FORMAT, "format_version": FORMAT_VERSION, "name": self.name,
                "files": [rank_file(self.name, r) for r in range(trainer.world_size)],
                "clips": int(clips.item()),
                "num_tokens": getattr(model, "num_tokens", None),
                "token_grid": list(grid) if grid is not None else None,
                "num_codes": getattr(config, "num_codes", None),
                "ckpt_path": str(trainer.ckpt_path) if trainer.ckpt_path else None,
            }
            manifest_path(self.output_dir, self.name).write_text(json.dumps(manifest, indent=2))

    def teardown(self, trainer, pl_module, stage: str) -> None:
        if self._file is not None:  # predict failed: leave the .partial file, no manifest
            self._file.close()
            self._file = None
