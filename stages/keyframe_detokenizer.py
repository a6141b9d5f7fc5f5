"""Stage 1b (keyframes): train the keyframe detokenizer g_I on the ``keyframe`` view (docs/design.md §6).

g_I learns to draw an image from the code ids the frozen keyframe tokenizer gives it, with the token selection
drawn as at inference, so at generation time the LLM's ids are what it was trained on. Only the condition heads
and the U-Net train; the tokenizer, the codebook, the feature-decoder trunk and the latent space stay frozen, out
of the optimiser and of the checkpoints, and a resumed run rebuilds them from the tokenizer export its checkpoint
records (refusing one that changed since). ``val/loss_other_codes`` is the learning check: ``val/loss`` below it
means the codes tell the U-Net about the image. The steps, batch keys, logs and exports are described in
``KeyframeDetokenizerStage``'s docstring.
"""

from __future__ import annotations

import hashlib
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_info
from torchmetrics import MeanMetric

from stages.base import OptimizerConfig, StageModule
from videolavit.models.export import ExportError, read_export
from videolavit.models.export_names import KEYFRAME_FEATURE_DECODER
from videolavit.models.keyframe_detokenizer import (
    CONDITION_HEADS,
    EXPORT_NAME,
    KeyframeDetokenizer,
    KeyframeDetokenizerConfig,
    KeyframeDiffusionConfig,
    save_keyframe_detokenizer,
)
from videolavit.models.keyframe_feature_decoder import KeyframeFeatureDecoderConfig
from videolavit.models.keyframe_tokenizer import KeyframeTokenizer
from videolavit.models.keyframe_tokenizer_export import EXPORT_NAME as TOKENIZER_EXPORT_NAME
from videolavit.models.keyframe_tokenizer_export import load_keyframe_tokenizer
from videolavit.models.keyframe_unet import KeyframeUNetConfig, load_shared_unet_weights
from videolavit.models.latent_space import LatentSpace, PixelSpace, images_to_uint8, latent_space_spec

DECODER_EXPORT_NAME = KEYFRAME_FEATURE_DECODER  # written by stages.keyframe_tokenizer
SOURCE_KEY = "keyframe_tokenizer_source"  # checkpoint entry: where the frozen parts came from
VAL_SEED = 20240  # base seed of validation noise, σ and token selection


def resize_square(images: torch.Tensor, size: int) -> torch.Tensor:
    """Float images [B, 3, H, W] -> [B, 3, size, size] (bilinear, antialiased when shrinking)."""
    if images.shape[-2:] == (size, size):
        return images
    return F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False, antialias=True)


def psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB of images in [-1, 1] [B, 3, H, W], measured on the [0, 1] scale."""
    mse = ((a.float() - b.float()) / 2).pow(2).flatten(1).mean(dim=1)
    return 10 * torch.log10(1.0 / mse.clamp_min(1e-10))


def _export_fingerprint(directory: Path) -> str:
    """SHA-256 over the tokenizer export's weight files: detects an export replaced since a run started."""
    digest = hashlib.sha256()
    for name in (TOKENIZER_EXPORT_NAME, DECODER_EXPORT_NAME):
        with open(directory / f"{name}.safetensors", "rb") as f:
            for block in iter(lambda: f.read(1 << 24), b""):
                digest.update(block)
    return digest.hexdigest()


def check_tokenizer_export(directory: str | Path, argument: str = "init_from") -> Path:
    """The directory as a Path if it holds a keyframe tokenizer export, else a clear error."""
    path = Path(directory).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(
            f"{argument} directory '{path}' does not exist: it must be the export directory of the keyframe "
            f"tokenizer stage (stages.keyframe_tokenizer, its model.init_args.export_dir), holding "
            f"{TOKENIZER_EXPORT_NAME}.* and {DECODER_EXPORT_NAME}.*")
    missing = [f"{name}{ext}" for name in (TOKENIZER_EXPORT_NAME, DECODER_EXPORT_NAME) for ext in (".json", ".safetensors")
               if not (path / f"{name}{ext}").is_file()]
    if missing:
        raise FileNotFoundError(f"{argument} directory '{path}' is not a keyframe tokenizer export: {missing} missing "
                                "(run the keyframe tokenizer stage with export_dir there first)")
    return path.resolve()


class KeyframeDetokenizerStage(StageModule):
    """Train g_I on the ``keyframe`` view, conditioned on the frozen keyframe tokenizer's code ids.

    Each step: the frozen keyframe tokenizer turns the image into code ids (no gradient; the selection is drawn as
    at inference, ``eval_selection`` of the tokenizer export); ``KeyframeDetokenizer.conditioning`` turns the ids
    into the U-Net's condition (codebook and feature-decoder trunk frozen, condition heads trained); the image,
    resized to ``image_size``, is encoded into the frozen ``latent_space``; the U-Net is trained with the EDM-style
    denoising loss of ``videolavit.diffusion`` (scaling and weighting chosen together, see
    ``videolavit.models.keyframe_detokenizer.KeyframeDiffusionConfig``).

    ``init_from`` is the directory of a keyframe tokenizer export (``keyframe_tokenizer.*`` and
    ``keyframe_feature_decoder.*`` from stage 1a): the tokenizer (with its ViT from ``backbone_weights`` or the file
    recorded in the export), the codebook and the feature decoder (trunk and condition heads) come from it. Frozen
    parts — ``tokenizer.*``, ``latent_space.*``, ``detokenizer.codebook.*`` and the decoder trunk — are kept out of
    the optimiser and out of checkpoints. A checkpoint records where the tokenizer export was and a fingerprint of
    it, so ``--ckpt_path last --model.init_from null`` rebuilds the frozen parts from there (and refuses an export
    that changed since). ``unet_weights`` (new runs only) starts the U-Net from a local SDXL ``unet/`` directory's
    matching tensors.

    Batch keys (``keyframe`` view): ``image`` uint8 [B, 3, S, S] (S: any size; resized to the tokenizer's ViT size
    for the ids and to ``image_size`` for the target), ``caption``, ``key``, ``clip_start``.

    Logged: ``train/loss``, ``train/tokens_per_image``; validation (fixed seeds: the same noise, σ and token
    selection every time): ``val/loss``, ``val/tokens_per_image``, ``val/loss_other_codes`` (the same loss when each
    image is conditioned on the codes of the image half a batch away: the learning check, ``val/loss`` below it
    means the codes tell the U-Net about the image) and, on up to ``val_samples`` images per rank, ``val/psnr`` (dB,
    sampled reconstructions from the ids vs the inputs at ``image_size``). ``sample_videos`` returns the
    reconstructions as 1-frame videos (``callbacks.video_samples.VideoSampleLogger``). Export at the end of ``fit``:
    ``keyframe_detokenizer.*`` with ``unet/`` (diffusers' ``UNet2DConditionModel``), ``scheduler/`` and ``vae/`` (a
    VAE latent space) in ``export_dir`` (load with
    ``videolavit.models.keyframe_detokenizer.load_keyframe_detokenizer``).

    Args:
        init_from: the keyframe tokenizer export directory (see above).
        unet: U-Net sizes (SDXL's by default); ``in_channels`` must be the latent space's channels.
        diffusion: preconditioning, training noise, sampling schedule, guidance, condition dropout.
        latent_space: where the U-Net diffuses (frozen): ``PixelSpace`` (default) or ``VaeLatentSpace``.
        image_size: pixels (square) of the generated keyframes; the view's images are resized to it.
        backbone_weights: the tokenizer's ViT file, overriding the one recorded in the export.
        unet_weights: local SDXL ``unet/`` (or pipeline) directory to start the U-Net from (new runs only).
        val_samples: images per rank and validation to reconstruct for ``val/psnr`` (0: none).
        val_sample_steps / val_guidance_scale: sampling for ``val/psnr`` and ``sample_videos`` (None: the
            diffusion config's).
        optimizer: AdamW + cosine (the experiment configs hold the paper's values).
        export_dir: where ``fit`` writes ``keyframe_detokenizer.*`` at the end.
        max_nonfinite_steps: non-finite optimizer steps in a row that stop ``fit`` (``StageModule``).
    """

    export_name = EXPORT_NAME

    def __init__(self, init_from: str | None = None, unet: KeyframeUNetConfig | None = None,
                 diffusion: KeyframeDiffusionConfig | None = None, latent_space: LatentSpace | None = None,
                 image_size: int = 1024, backbone_weights: str | None = None, unet_weights: str | None = None,
                 val_samples: int = 8, val_sample_steps: int | None = None, val_guidance_scale: float | None = None,
                 optimizer: OptimizerConfig | None = None, export_dir: str | None = None,
                 max_nonfinite_steps: int = 20):
        super().__init__(optimizer=optimizer, init_from=init_from, export_dir=export_dir,
                         max_nonfinite_steps=max_nonfinite_steps)
        self.save_hyperparameters(ignore=["latent_space"])
        if init_from:
            check_tokenizer_export(init_from)  # fail at construction, not after the data has been set up
        self.unet_config = unet or KeyframeUNetConfig()
        self.diffusion_config = diffusion or KeyframeDiffusionConfig()
        self.latent_space = (latent_space or PixelSpace()).requires_grad_(False).eval()
        if self.unet_config.in_channels != self.latent_space.channels:
            raise ValueError(f"unet.in_channels {self.unet_config.in_channels} != the latent space's channels "
                             f"{self.latent_space.channels} ({type(self.latent_space).__name__})")
        self.image_size = image_size
        self.latent_space.latent_size(image_size, image_size)  # divisible by its down-sampling, or a clear error
        self.backbone_weights, self.unet_weights = backbone_weights, unet_weights
        self.val_samples, self.val_sample_steps, self.val_guidance_scale = val_samples, val_sample_steps, val_guidance_scale
        self.tokenizer: KeyframeTokenizer | None = None  # built from the tokenizer export (setup / resume)
        self.detokenizer: KeyframeDetokenizer | None = None
        self.source: dict | None = None
        self.val_loss = MeanMetric()
        self.val_loss_other = MeanMetric()
        self.val_psnr = MeanMetric()
        self.val_tokens = MeanMetric()
        self._val_sampled = 0

    # ---- frozen parts ----------------------------------------------------------------------------
    def frozen_prefixes(self) -> tuple[str, ...]:
        prefixes = ["tokenizer.", "latent_space.", "detokenizer.codebook."]
        if self.detokenizer is not None:
            prefixes += [f"detokenizer.feature_decoder.{name}" for name in self.detokenizer.feature_decoder.state_dict()
                         if not name.startswith(CONDITION_HEADS)]
        return tuple(prefixes)

    def train(self, mode: bool = True) -> "KeyframeDetokenizerStage":
        super().train(mode)
        for frozen in (self.tokenizer, self.latent_space):
            if frozen is not None:
                frozen.eval()  # the tokenizer samples its selection as at inference, and never updates its codebook
        return self

    def _build(self, directory: str | Path, backbone_weights: str | None) -> None:
        """Tokenizer (frozen), detokenizer with the tokenizer's codebook and feature decoder, fresh U-Net."""
        directory = check_tokenizer_export(directory)
        tokenizer = load_keyframe_tokenizer(directory, backbone_weights=backbone_weights).requires_grad_(False)
        decoder_state, decoder_meta = read_export(directory, DECODER_EXPORT_NAME)
        config = KeyframeDetokenizerConfig(
            unet=self.unet_config, decoder=KeyframeFeatureDecoderConfig(**decoder_meta["config"]),
            diffusion=self.diffusion_config, num_codes=tokenizer.config.num_codes, code_dim=tokenizer.config.code_dim,
            image_size=self.image_size, latent_downsample=self.latent_space.downsample)
        detokenizer = KeyframeDetokenizer(config)
        detokenizer.load_tokenizer_parts(tokenizer.quantize.embedding.weight, decoder_state)
        detokenizer.latent_space_spec = latent_space_spec(self.latent_space)
        self.tokenizer = tokenizer.to(self.device).eval()
        self.detokenizer = detokenizer.to(self.device)
        self.source = {"directory": str(directory), "backbone_weights": backbone_weights,
                       "fingerprint": _export_fingerprint(directory)}

    # ---- init_from / resume ----------------------------------------------------------------------
    def load_init_from(self, directory: str) -> None:
        if self.detokenizer is not None:
            return  # built once: a later trainer call in this process (validate after fit) keeps the trained weights
        self._build(directory, self.backbone_weights)
        if self.unet_weights:
            shared = load_shared_unet_weights(self.detokenizer.unet, self.unet_weights, "model.init_args.unet_weights")
            rank_zero_info(f"keyframe U-Net: {len(shared.loaded)} tensors from {self.unet_weights}; "
                           f"{len(shared.mismatched)} of another shape and {len(shared.missing)} missing keep their init")

    def _require_built(self) -> None:
        # Checked once a checkpoint could have been restored (Lightning sets ckpt_path only after ``setup``).
        if self.detokenizer is None:
            raise ValueError("KeyframeDetokenizerStage needs model.init_args.init_from: the keyframe tokenizer "
                             "export directory (or --ckpt_path of a run of this stage)")

    def configure_optimizers(self):
        self._require_built()
        return super().configure_optimizers()

    def on_validation_start(self) -> None:
        self._require_built()

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint[SOURCE_KEY] = dict(self.source or {})

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        source = checkpoint.get(SOURCE_KEY)
        if not source:
            raise ExportError(f"checkpoint has no '{SOURCE_KEY}' record: not written by KeyframeDetokenizerStage")
        if self.detokenizer is None:
            self._build(source["directory"], self.backbone_weights or source.get("backbone_weights"))
        if self.source["fingerprint"] != source["fingerprint"]:
            raise ExportError(f"the keyframe tokenizer export in {self.source['directory']} is not the one this checkpoint "
                              f"was trained with ({source['directory']}, fingerprint {source['fingerprint'][:12]}…): "
                              "its codes would not mean the same")
        super().on_load_checkpoint(checkpoint)

    # ---- data ------------------------------------------------------------------------------------
    def _ids(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 images [B, 3, S, S] -> code ids [B, L] (-1 padded) from the frozen tokenizer."""
        pixels = resize_square(images.float().div(255.0), self.tokenizer.config.vit.image_size)
        return self.tokenizer.tokenize(pixels)[0]

    def _targets(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 images -> float [-1, 1] at ``image_size``."""
        return resize_square(images.float().div(127.5).sub(1.0), self.image_size).clamp(-1.0, 1.0)

    @contextmanager
    def _seeded(self, seed: int):
        devices = [self.device.index or 0] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            yield torch.Generator(device=self.device).manual_seed(seed)

    # ---- steps -----------------------------------------------------------------------------------
    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        images = batch["image"]
        ids = self._ids(images)
        cond = self.detokenizer.conditioning(ids)
        loss = self.detokenizer.loss(self.latent_space.encode(self._targets(images)), cond)
        size = images.shape[0]
        self.log("train/loss", loss, prog_bar=True, batch_size=size)
        self.log("train/tokens_per_image", (ids >= 0).sum(dim=1).float().mean(), batch_size=size)
        return loss

    def on_validation_epoch_start(self) -> None:
        self._val_sampled = 0

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        images = batch["image"]
        size = images.shape[0]
        with self._seeded(VAL_SEED + batch_idx) as generator:
            ids = self._ids(images)
            cond = self.detokenizer.conditioning(ids)
            x0 = self.latent_space.encode(self._targets(images))
            state = generator.get_state()
            loss = self.detokenizer.loss(x0, cond, generator=generator)
            if size > 1:  # the same noise and σ, the codes of the image half a batch away (batches hold
                # consecutive keyframes of one video next to each other)
                other = {k: v.roll(size // 2, dims=0) for k, v in cond.items()}
                loss_other = self.detokenizer.loss(x0, other, generator=generator.set_state(state))
                self.val_loss_other.update(loss_other, weight=size)
        self.val_loss.update(loss, weight=size)
        self.val_tokens.update((ids >= 0).sum(dim=1).float())
        take = min(size, self.val_samples - self._val_sampled)
        if take > 0:
            recon = self.reconstruct(images[:take], seed=VAL_SEED + batch_idx)
            self.val_psnr.update(psnr(recon, self._targets(images[:take])))
            self._val_sampled += take

    def on_validation_epoch_end(self) -> None:
        values = {"val/loss": self.val_loss.compute(), "val/tokens_per_image": self.val_tokens.compute()}
        if self.val_loss_other.update_called:
            values["val/loss_other_codes"] = self.val_loss_other.compute()
        if self.val_samples > 0:
            values["val/psnr"] = self.val_psnr.compute()
        self.log_dict(values)
        for metric in (self.val_loss, self.val_loss_other, self.val_psnr, self.val_tokens):
            metric.reset()

    @torch.no_grad()
    def reconstruct(self, images: torch.Tensor, seed: int = VAL_SEED) -> torch.Tensor:
        """uint8 images [B, 3, S, S] -> sampled reconstructions from their code ids, float [-1, 1] at ``image_size``."""
        with self._seeded(seed) as generator:
            cond = self.detokenizer.conditioning(self._ids(images))
            latents = self.detokenizer.sample(cond, num_steps=self.val_sample_steps,
                                              guidance_scale=self.val_guidance_scale, generator=generator)
        return self.latent_space.decode(latents).float().clamp(-1.0, 1.0)

    def sample_videos(self, batch: dict) -> dict:
        """Reconstructions of (up to ``val_samples`` of) the batch's images as 1-frame videos."""
        images = batch["image"][: max(1, self.val_samples)]
        videos = images_to_uint8(self.reconstruct(images))[:, None]  # [B, 1, 3, H, W]
        return {"videos": videos, "captions": list(batch.get("caption", []))[: videos.shape[0]]}

    # ---- export ----------------------------------------------------------------------------------
    def export(self, directory: str | Path) -> None:
        if self.detokenizer is None:
            raise RuntimeError("nothing to export: the keyframe detokenizer was never built (no init_from)")
        save_keyframe_detokenizer(self.detokenizer, directory, self.latent_space, provenance=dict(self.source or {}))
