"""Stage 1 (keyframes): train the LaVIT dynamic keyframe tokenizer on the ``keyframe`` view (docs/design.md §6).

The tokenizer learns to keep the semantics of a **frozen** EVA-CLIP ViT in a few discrete codes: the selector,
merger, code projection, EMA codebook and feature decoder train to reconstruct every patch feature of the ViT
(LaVIT's objective, ``keyframe_tokenizer_loss``). The ViT is never optimised and never checkpointed; it is
loaded from its local file whenever the stage is built, resume included. Parts that belong to the exports but
are trained by later stages (``vit_proj`` with the LLM, the U-Net condition heads with g_I) are frozen here.

Selection outside training follows ``tokenizer.eval_selection``; the experiment configs sample, as the release
does, because a selector trained on Gumbel samples keeps almost nothing under the deterministic threshold.
What trains, batch keys, logs and exports: ``KeyframeTokenizerStage``'s docstring.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_warn
from torchmetrics import MeanMetric

from stages.base import OptimizerConfig, StageModule
from videolavit.metrics.codebook_usage import CodebookUsage
from videolavit.models.export import read_export, save_export
from videolavit.models.export_names import KEYFRAME_FEATURE_DECODER
from videolavit.models.keyframe_feature_decoder import KeyframeFeatureDecoder, KeyframeFeatureDecoderConfig
from videolavit.models.keyframe_tokenizer import KeyframeEncoding, KeyframeTokenizer, KeyframeTokenizerConfig
from videolavit.models.keyframe_tokenizer_export import (
    EXPORT_NAME,
    backbone_fingerprint,
    check_backbone,
    init_backbone,
    load_trained_parts,
    read_keyframe_tokenizer,
    save_keyframe_tokenizer,
)
from videolavit.models.keyframe_tokenizer_loss import KeyframeTokenizerLossConfig, keyframe_tokenizer_loss

DECODER_EXPORT_NAME = KEYFRAME_FEATURE_DECODER
FROZEN_PREFIX = "model.encoder."
# In the exports, but trained by later stages (see KeyframeTokenizerStage's docstring).
NOT_TRAINED_HERE = ("model.vit_proj.", "decoder.unet_proj_1.", "decoder.unet_proj_2.", "decoder.unet_attnpool.")
CORE_TERMS = ("loss", "reconstruction", "keep_ratio", "commitment")  # logged in every run


def default_decoder_config(tokenizer: KeyframeTokenizerConfig) -> KeyframeFeatureDecoderConfig:
    """The release's decoder sizes, with the code/feature/patch sizes taken from the tokenizer."""
    n = tokenizer.vit.num_patches
    return KeyframeFeatureDecoderConfig(code_dim=tokenizer.code_dim, feature_dim=tokenizer.vit.width,
                                        num_queries=n, max_codes=n)


def check_configs(tokenizer: KeyframeTokenizerConfig, decoder: KeyframeFeatureDecoderConfig) -> None:
    n = tokenizer.vit.num_patches
    problems = []
    if decoder.code_dim != tokenizer.code_dim:
        problems.append(f"decoder.code_dim {decoder.code_dim} != tokenizer.code_dim {tokenizer.code_dim}")
    if decoder.feature_dim != tokenizer.vit.width:
        problems.append(f"decoder.feature_dim {decoder.feature_dim} != ViT width {tokenizer.vit.width} "
                        "(the decoder reconstructs the ViT's patch features)")
    if decoder.num_queries != n:
        problems.append(f"decoder.num_queries {decoder.num_queries} != ViT patches {n}")
    if decoder.max_codes < n:
        problems.append(f"decoder.max_codes {decoder.max_codes} < ViT patches {n} (an image may keep them all)")
    if problems:
        raise ValueError("keyframe tokenizer and feature decoder do not fit together: " + "; ".join(problems))


def images_from_batch(batch: dict) -> torch.Tensor:
    """The view's uint8 images -> float in [0, 1] (float input is taken as already in [0, 1])."""
    image = batch["image"]
    return image.float().div_(255.0) if image.dtype == torch.uint8 else image.float()


class KeyframeTokenizerStage(StageModule):
    """Train the keyframe tokenizer and its feature decoder against the frozen ViT's patch features.

    What trains: the token selector, the token merger, the code projection (``encode_task_layer``), the
    L2-normalised codebook (by EMA, not by the optimiser) and the feature decoder, which reconstructs every patch
    feature of the **frozen** EVA-CLIP ViT from the codes (LaVIT's cosine objective plus the keep-ratio regulariser
    and the commitment term, see ``keyframe_tokenizer_loss``).

    What does not: the ViT (``model.encoder.``) is frozen: never optimised, never in checkpoints
    (``frozen_prefixes``), and loaded from the local ``backbone_weights`` file every time the stage is built, resume
    included (the base's ``on_load_checkpoint`` fills the checkpoint's missing ``model.encoder.*`` from the freshly
    loaded backbone). ``backbone_weights: null`` means a seeded random ViT, allowed for tests and tiny runs only (it
    warns). ``model.vit_proj`` (continuous features for the LLM, trained with the LLM) and the decoder's U-Net
    condition heads (``unet_proj_1/2``, ``unet_attnpool``: trained with the keyframe detokenizer) are part of the
    exports but take no part in this objective, so they are not trained here (``requires_grad=False``; they stay in
    checkpoints and exports, and DDP sees no unused parameters).

    Batch keys (``keyframe`` view): ``image`` uint8 [B, 3, S, S] (S = the ViT's image size), ``key``,
    ``clip_start``. Images become float in [0, 1]; the tokenizer applies the CLIP mean/std itself.

    Logged: ``train/loss``, ``train/reconstruction_loss`` (1 - cosine), ``train/keep_ratio_loss``,
    ``train/commitment_loss``, ``train/keep_ratio`` (tokens kept per image / patches), ``train/tokens_per_image``,
    ``train/codebook_usage`` and ``train/perplexity`` (this batch), plus ``train/<term>_loss`` for each optional
    term the loss config switches on (``weighted_reconstruction``, ``selector_deviation``, ``similarity``).
    Validation (selection as at inference): ``val/loss``, ``val/reconstruction_loss``, ``val/feature_cosine`` (mean
    cosine between reconstructed and true ViT features over all patches), ``val/tokens_per_image``,
    ``val/keep_ratio``, ``val/keep_prob`` (the selector's mean p(keep)), and ``val/codebook_usage`` /
    ``val/perplexity`` over the whole validation epoch (all ranks).

    Selection outside training follows ``tokenizer.eval_selection``. Training draws Gumbel samples, so the selector
    learns p(keep) near the target ratio (1/3) and, for a long time, near it for *most* patches; the deterministic
    ``threshold`` mode (p >= 0.5) then keeps almost nothing (figures in docs/measurements.md). ``val/keep_ratio``
    far below ``val/keep_prob`` shows that mismatch; the release samples at inference (``eval_selection: sample``),
    which the experiment configs use.

    ``predict`` returns per image ``{"key", "clip_start", "ids" [B, L] (-1 padded), "lengths" [B]}``. Exports
    (``export_dir``, at the end of ``fit``): ``keyframe_tokenizer`` (trained parts only, see
    ``videolavit.models.keyframe_tokenizer_export``; load it with ``load_keyframe_tokenizer(dir,
    backbone_weights)``) and ``keyframe_feature_decoder`` (``load_export``).

    Args:
        tokenizer: sizes of the tokenizer and its ViT (release: EVA-CLIP ViT-g/14, 16384x32 codes).
        decoder: sizes of the feature decoder (default: the release's, fitted to ``tokenizer``).
        loss: keep-ratio target and weight (paper: rho = 1/3) and the optional small-object terms
            (``KeyframeTokenizerLossConfig``; off by default, i.e. the paper's objective).
        backbone_weights: local EVA-CLIP ViT weight file (safetensors or a weights-only torch file). None:
            a random ViT seeded by ``backbone_seed`` — for tests and tiny runs only (warns).
        backbone_prefix: key prefix to select and strip in that file (``"encoder."`` takes the ViT out of a
            full keyframe tokenizer checkpoint such as the release's); "" when the file is the ViT alone.
        optimizer: AdamW + cosine (paper Table 6, tokenizer row, by default).
        init_from: an export directory of this stage (both sub-models; the backbone must be the same).
        export_dir: where ``fit`` writes ``keyframe_tokenizer`` and ``keyframe_feature_decoder`` at the end.
        max_nonfinite_steps: non-finite optimizer steps in a row that stop ``fit`` (``StageModule``).
    """

    export_name = EXPORT_NAME

    def __init__(self, tokenizer: KeyframeTokenizerConfig | None = None,
                 decoder: KeyframeFeatureDecoderConfig | None = None,
                 loss: KeyframeTokenizerLossConfig | None = None, backbone_weights: str | None = None,
                 backbone_prefix: str = "", backbone_seed: int = 0, optimizer: OptimizerConfig | None = None,
                 init_from: str | None = None,
                 export_dir: str | None = None, max_nonfinite_steps: int = 20):
        super().__init__(optimizer=optimizer, init_from=init_from, export_dir=export_dir,
                         max_nonfinite_steps=max_nonfinite_steps)
        self.save_hyperparameters()
        tokenizer = tokenizer or KeyframeTokenizerConfig()
        decoder = decoder or default_decoder_config(tokenizer)
        check_configs(tokenizer, decoder)
        self.loss_config = loss or KeyframeTokenizerLossConfig()
        self.model = KeyframeTokenizer(tokenizer)
        self.decoder = KeyframeFeatureDecoder(decoder)
        if next(self.model.encoder.parameters()).is_meta:  # built for ``plan``: shapes only, nothing to load
            self.model.encoder.requires_grad_(False).eval()
            self.backbone = None
        else:
            self.backbone = init_backbone(self.model, backbone_weights, backbone_seed, weights_prefix=backbone_prefix)
        for name, param in self.named_parameters():
            if name.startswith(NOT_TRAINED_HERE):
                param.requires_grad_(False)
        self.num_patches = tokenizer.vit.num_patches
        self.val_loss = MeanMetric()
        self.val_recon = MeanMetric()
        self.val_cosine = MeanMetric()
        self.val_tokens = MeanMetric()
        self.val_keep_prob = MeanMetric()
        self.val_codes = CodebookUsage(tokenizer.num_codes)

    def frozen_prefixes(self) -> tuple[str, ...]:
        return (FROZEN_PREFIX,)

    # ---- init_from -----------------------------------------------------------------------------
    def load_init_from(self, directory: str) -> None:
        state, _, recorded = read_keyframe_tokenizer(directory, EXPORT_NAME)
        source = f"init_from export '{EXPORT_NAME}' in {directory}"
        check_backbone(self.backbone, recorded, source)
        load_trained_parts(self.model, state, source)
        decoder_state, _ = read_export(directory, DECODER_EXPORT_NAME)
        self.decoder.load_state_dict(decoder_state, strict=True)

    # ---- steps ---------------------------------------------------------------------------------
    def forward(self, images: torch.Tensor) -> tuple[KeyframeEncoding, torch.Tensor, dict[str, torch.Tensor]]:
        """Images in [0, 1] -> (encoding, reconstructed ViT features [B, N, C], loss terms)."""
        encoding = self.model.encode(images)
        reconstruction = self.decoder(encoding.codes, encoding.mask)
        return encoding, reconstruction, keyframe_tokenizer_loss(reconstruction, encoding, self.loss_config)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        encoding, _, terms = self(images_from_batch(batch))
        size = encoding.lengths.shape[0]
        tokens = encoding.lengths.float().mean()
        self.log("train/loss", terms["loss"], prog_bar=True, batch_size=size)
        self.log_dict({"train/reconstruction_loss": terms["reconstruction"],
                       "train/keep_ratio_loss": terms["keep_ratio"],
                       "train/commitment_loss": terms["commitment"],
                       "train/keep_ratio": tokens / self.num_patches,
                       "train/tokens_per_image": tokens,
                       "train/codebook_usage": encoding.usage,
                       "train/perplexity": encoding.perplexity}, batch_size=size)
        optional = {f"train/{name}_loss": value for name, value in terms.items() if name not in CORE_TERMS}
        if optional:  # terms the loss config switched on (e.g. ``similarity``)
            self.log_dict(optional, batch_size=size)
        return terms["loss"]

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        encoding, reconstruction, terms = self(images_from_batch(batch))
        size = encoding.lengths.shape[0]
        cosine = F.cosine_similarity(reconstruction.float(), encoding.vit_features.float(), dim=-1)  # [B, N]
        self.val_loss.update(terms["loss"], weight=size)
        self.val_recon.update(terms["reconstruction"], weight=size)
        self.val_cosine.update(cosine)
        self.val_tokens.update(encoding.lengths.float())
        self.val_keep_prob.update(encoding.keep_log_probs[..., 0].float().exp())
        self.val_codes.update(encoding.ids)

    def on_validation_epoch_end(self) -> None:
        tokens = self.val_tokens.compute()
        codes = self.val_codes.compute()
        self.log_dict({"val/loss": self.val_loss.compute(), "val/reconstruction_loss": self.val_recon.compute(),
                       "val/feature_cosine": self.val_cosine.compute(), "val/tokens_per_image": tokens,
                       "val/keep_ratio": tokens / self.num_patches, "val/keep_prob": self.val_keep_prob.compute(),
                       "val/codebook_usage": codes["usage"].float(), "val/perplexity": codes["perplexity"].float()})
        for metric in (self.val_loss, self.val_recon, self.val_cosine, self.val_tokens, self.val_keep_prob,
                       self.val_codes):
            metric.reset()

    def predict_step(self, batch: dict, batch_idx: int) -> dict:
        ids, lengths = self.model.tokenize(images_from_batch(batch))
        return {"key": batch["key"], "clip_start": batch["clip_start"].cpu(), "ids": ids.cpu(),
                "lengths": lengths.cpu()}

    # ---- export --------------------------------------------------------------------------------
    def export(self, directory: str | Path) -> None:
        if backbone_fingerprint(self.model.encoder) != self.backbone.fingerprint:
            rank_zero_warn("keyframe tokenizer: the frozen ViT's weights changed during the run (e.g. a "
                           "precision plugin cast them); the export records the backbone file as loaded, so "
                           "ids computed with it may differ slightly from the trained model's")
        save_keyframe_tokenizer(self.model, directory, self.backbone)
        save_export(self.decoder, directory, DECODER_EXPORT_NAME, self.decoder.config)
