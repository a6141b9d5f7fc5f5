"""Stage 0 (small runs): pre-train the keyframe tokenizer's ViT on image-caption pairs.

At full scale that ViT is the released EVA-CLIP ViT-g/14 and this stage is not run. Small runs have no such
model offline, and a random ViT's features hardly carry an object's shape, so nothing downstream could learn
it; this stage trains an ``EvaViT`` of the tokenizer's sizes on local image-caption pairs by caption-word
prediction (``videolavit.models.caption_word_pretraining``) and exports it for
``KeyframeTokenizerStage(backbone_weights=...)``.

Batch keys (``ImageTextView``): ``image`` uint8 [B, 3, S, S], ``caption`` list[str].

Logged: ``train/loss``; ``val/loss`` and, for each group of ``probe_words`` (mutually exclusive words such
as the shapes), ``val/word_accuracy/<group>``: the share of held-out images whose caption word of that group
scores highest within the group (chance 1 / group size).

Export (``export_dir``, end of ``fit``): ``vision_backbone.safetensors`` + ``.json`` (the ViT alone).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torchmetrics import MeanMetric, SumMetric

from stages.base import OptimizerConfig, StageModule
from stages.keyframe_tokenizer import images_from_batch
from videolavit.models.caption_word_pretraining import (
    CaptionWordPretraining,
    CaptionWordPretrainingConfig,
    group_accuracy,
)
from videolavit.models.export_names import VISION_BACKBONE


class VisionBackboneStage(StageModule):
    """Args:
        model: the ViT (must equal the keyframe tokenizer's ``tokenizer.vit``) and the head's word buckets.
        probe_words: group name -> mutually exclusive words whose held-out accuracy is logged.
        optimizer: AdamW + cosine.
        export_dir: where ``fit`` writes ``vision_backbone`` at the end.
        max_nonfinite_steps: non-finite optimizer steps in a row that stop ``fit`` (``StageModule``).
    """

    export_name = VISION_BACKBONE

    def __init__(self, model: CaptionWordPretrainingConfig | None = None,
                 probe_words: dict[str, list[str]] | None = None, optimizer: OptimizerConfig | None = None,
                 export_dir: str | None = None, max_nonfinite_steps: int = 20):
        super().__init__(optimizer=optimizer, init_from=None, export_dir=export_dir,
                         max_nonfinite_steps=max_nonfinite_steps)
        self.save_hyperparameters()
        self.model = CaptionWordPretraining(model or CaptionWordPretrainingConfig())
        self.probe_words = {name: [w.lower() for w in words] for name, words in (probe_words or {}).items()}
        for name, words in self.probe_words.items():
            if len(words) < 2:
                raise ValueError(f"probe_words[{name!r}] needs at least two words to choose between, got {words}")
        self.val_loss = MeanMetric()
        self.val_correct = torch.nn.ModuleDict({name: SumMetric() for name in self.probe_words})
        self.val_counted = torch.nn.ModuleDict({name: SumMetric() for name in self.probe_words})

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss, _ = self.model.loss(images_from_batch(batch), batch["caption"])
        self.log("train/loss", loss, prog_bar=True, batch_size=len(batch["caption"]))
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        loss, logits = self.model.loss(images_from_batch(batch), batch["caption"])
        self.val_loss.update(loss, weight=len(batch["caption"]))
        for name, words in self.probe_words.items():
            correct, counted = group_accuracy(logits, batch["caption"], words, self.model.config.word_buckets)
            self.val_correct[name].update(float(correct))
            self.val_counted[name].update(float(counted))

    def on_validation_epoch_end(self) -> None:
        if self.val_loss.update_count == 0:
            return  # no validation file: nothing was seen
        scalars = {"val/loss": self.val_loss.compute()}
        for name in self.probe_words:
            counted = self.val_counted[name].compute()
            scalars[f"val/word_accuracy/{name}"] = self.val_correct[name].compute() / counted.clamp(min=1)
        self.log_dict(scalars)
        for metric in [self.val_loss, *self.val_correct.values(), *self.val_counted.values()]:
            metric.reset()

    def export(self, directory: str | Path) -> None:
        self.model.export_backbone(directory, self.export_name)
