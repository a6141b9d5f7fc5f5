"""Stage 1a: train the motion tokenizer (VQ-VAE over clip motion fields) on the ``motion`` view.

Batch keys: ``motion`` float32 [B, 2, 24, H, W] (tokenizer scale, ×10), ``key``, ``clip_start``.
Logged: ``train/loss``, ``train/recon_mse``, ``train/commit_loss``, ``train/codebook_usage``,
``train/perplexity``; on validation ``val/recon_mse``, ``val/zero_mse`` (the MSE of predicting no motion),
``val/recon_ratio`` (their ratio: the learning check), and usage/perplexity over the whole epoch.
``predict`` returns token ids per clip (see ``callbacks.token_dump``).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torchmetrics import MeanMetric

from stages.base import OptimizerConfig, StageModule
from videolavit.metrics.codebook_usage import CodebookUsage
from videolavit.models.export import read_export, save_export
from videolavit.models.export_names import MOTION_TOKENIZER
from videolavit.models.motion_tokenizer import MotionTokenizer, MotionTokenizerConfig

EXPORT_NAME = MOTION_TOKENIZER


class MotionTokenizerStage(StageModule):
    """Args:
        tokenizer: every size of the tokenizer (the release model by default; see experiments/*.yaml).
        optimizer: AdamW + cosine schedule (paper Table 6 for the tokenizer by default).
        export_dir: where ``fit`` writes ``motion_tokenizer.safetensors`` + ``.json`` at the end.
        max_nonfinite_steps: non-finite optimizer steps in a row that stop ``fit`` (``StageModule``).
    """

    export_name = EXPORT_NAME

    def __init__(self, tokenizer: MotionTokenizerConfig | None = None, optimizer: OptimizerConfig | None = None,
                 init_from: str | None = None, export_dir: str | None = None, max_nonfinite_steps: int = 20):
        super().__init__(optimizer=optimizer, init_from=init_from, export_dir=export_dir,
                         max_nonfinite_steps=max_nonfinite_steps)
        self.save_hyperparameters()
        self.model = MotionTokenizer(tokenizer or MotionTokenizerConfig())
        self.val_recon = MeanMetric()
        self.val_zero = MeanMetric()
        self.val_codes = CodebookUsage(self.model.config.num_codes)

    def load_init_from(self, directory: str) -> None:
        state, _ = read_export(directory, EXPORT_NAME)
        self.model.load_state_dict(state, strict=True)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        out = self.model(batch["motion"])
        size = batch["motion"].shape[0]
        self.log("train/loss", out["loss"], prog_bar=True, batch_size=size)
        self.log_dict({"train/recon_mse": out["recon_loss"], "train/commit_loss": out["commit_loss"],
                       "train/codebook_usage": out["usage"], "train/perplexity": out["perplexity"]},
                      batch_size=size)
        return out["loss"]

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        motion = batch["motion"]
        out = self.model(motion)
        self.val_recon.update(out["recon_loss"], weight=motion.shape[0])
        self.val_zero.update(motion.float().pow(2).mean(), weight=motion.shape[0])
        self.val_codes.update(out["ids"])

    def on_validation_epoch_end(self) -> None:
        recon, zero = self.val_recon.compute(), self.val_zero.compute()
        codes = self.val_codes.compute()
        self.log_dict({"val/recon_mse": recon, "val/zero_mse": zero, "val/recon_ratio": recon / zero.clamp_min(1e-12),
                       "val/codebook_usage": codes["usage"].float(), "val/perplexity": codes["perplexity"].float()})
        for metric in (self.val_recon, self.val_zero, self.val_codes):
            metric.reset()

    def predict_step(self, batch: dict, batch_idx: int) -> dict:
        return {"key": batch["key"], "clip_start": batch["clip_start"].cpu(),
                "ids": self.model.encode(batch["motion"]).cpu()}

    def export(self, directory: str | Path) -> None:
        save_export(self.model, directory, EXPORT_NAME, self.model.config)
