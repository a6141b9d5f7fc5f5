"""Stage 1b: train the video detokenizer g_V (keyframe + motion -> clip) on the ``video`` view (docs/design.md §7).

Frozen and never checkpointed: the latent space (a VAE from a local directory, or pixels) and the motion
tokenizer from ``init_from`` (the stage-1a export directory). By default the U-Net is conditioned on the
tokenizer's reconstruction of each clip's motion, ``decode(encode(motion))``, which is what it gets at
inference when the motion tokens come from the LLM; ``motion_source: raw`` conditions on the extracted
field itself (at the view's scale: set ``detokenizer.motion_gain`` to match). A resumed run
(``--ckpt_path``, no ``init_from``) reloads the tokenizer from the directory recorded in the checkpoint.
``val/loss_other_motion`` and ``val/direction_agreement`` check that the U-Net follows the motion; batch keys
and logs: ``VideoDetokenizerStage``'s docstring.
"""

from __future__ import annotations

from pathlib import Path

import torch
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info

from stages.base import OptimizerConfig, StageModule
from videolavit.models.export import ExportError, read_export
from videolavit.models.export_names import MOTION_TOKENIZER
from videolavit.models.latent_space import build_latent_space, images_to_uint8
from videolavit.models.motion_tokenizer import MotionTokenizer, MotionTokenizerConfig
from videolavit.models.video_detokenizer import (
    EXPORT_NAME,
    VideoDetokenizer,
    VideoDetokenizerConfig,
    VideoDetokenizerSpec,
    read_video_detokenizer,
    save_video_detokenizer,
)
from videolavit.models.video_unet import load_svd_unet_weights
from videolavit.video.motion_direction import direction_agreement, measure_motion, motion_field_direction
from videolavit.video.motion_grid import TOKENIZER_SCALE

TOKENIZER_EXPORT = MOTION_TOKENIZER
MOTION_SOURCES = ("tokenizer", "raw")
PIXEL_SPACE = {"class_path": "videolavit.models.latent_space.PixelSpace", "init_args": {}}


class VideoDetokenizerStage(StageModule):
    """Train g_V on the ``video`` view: each clip reconstructed from its keyframe and its motion.

    Batch keys: ``frames`` uint8 [B, T, 3, H, W], ``keyframe`` uint8 [B, 3, H, W], ``motion`` float32
    [B, 2, T, gh, gw] (at the view's ``scale``), ``caption`` list[str], ``key``.

    Logged: ``train/loss``; ``val/loss`` (fixed per-batch seeds for σ, noise and augmentation, so values are
    comparable across validations) and ``val/loss_other_motion`` (the same, each clip conditioned on another clip's
    motion: it exceeds ``val/loss`` once the U-Net follows the motion); at the end of each validation (rank 0, the
    first ``direction_clips`` clips) ``val/direction_agreement`` — the share of reconstructed clips whose measured
    motion direction (``measure_motion``: our MPEG-4 re-encode) is the conditioning field's dominant direction — and
    ``val/direction_agreement_input``, the same measure on the real frames (its ceiling). ``sample_videos(batch)``
    reconstructs a batch's clips for ``VideoSampleLogger`` / ``VideoGenerationMetrics``.

    Args:
        detokenizer: every size of g_V (the release model by default; see experiments/*.yaml).
        latent_space: ``{"class_path", "init_args"}`` of the frozen latent space (``PixelSpace`` or
            ``VaeLatentSpace`` with a local directory).
        motion_source: "tokenizer" (default; needs ``init_from``) or "raw".
        init_from: a directory with the stage-1a ``motion_tokenizer`` export (frozen).
        unet_init: a local SVD directory (pipeline root or its ``unet/``) to initialise the U-Net from.
        weights_from: a previous g_V export directory (progressive resolution: the next stage starts there).
        gradient_checkpointing: recompute U-Net activations in the backward pass (full-size models).
        sample_steps / sample_guidance: the sampler used for ``sample_videos`` and the direction check.
        direction_clips: validation clips reconstructed for ``val/direction_agreement`` (0: off).
        val_seed: base seed of validation noise and sampling.
        export_dir: where ``fit`` writes ``video_detokenizer.safetensors`` + ``.json`` and ``unet/``,
            ``scheduler/`` (and ``vae/`` for a VAE latent space) at the end.
        max_nonfinite_steps: non-finite optimizer steps in a row that stop ``fit`` (``StageModule``).
    """

    export_name = EXPORT_NAME

    def __init__(self, detokenizer: VideoDetokenizerConfig | None = None, latent_space: dict | None = None,
                 motion_source: str = "tokenizer", unet_init: str | None = None, weights_from: str | None = None,
                 gradient_checkpointing: bool = False, sample_steps: int = 25,
                 sample_guidance: tuple[float, float] = (1.0, 4.0), direction_clips: int = 8, val_seed: int = 0,
                 optimizer: OptimizerConfig | None = None, init_from: str | None = None,
                 export_dir: str | None = None, max_nonfinite_steps: int = 20):
        super().__init__(optimizer=optimizer, init_from=init_from, export_dir=export_dir,
                         max_nonfinite_steps=max_nonfinite_steps)
        self.save_hyperparameters()
        if motion_source not in MOTION_SOURCES:
            raise ValueError(f"motion_source must be one of {MOTION_SOURCES}, got {motion_source!r}")
        if unet_init and weights_from:
            raise ValueError("set unet_init (SVD weights) or weights_from (a previous g_V export), not both: "
                             "weights_from replaces every weight unet_init would load")
        self.model = VideoDetokenizer(detokenizer or VideoDetokenizerConfig())
        self.latent_space_config = dict(latent_space or PIXEL_SPACE)
        self.latent_space = build_latent_space(self.latent_space_config)
        if self.latent_space.channels != self.model.latent_channels:
            raise ValueError(f"the latent space has {self.latent_space.channels} channels but the U-Net is built "
                             f"for {self.model.latent_channels} (detokenizer.unet.latent_channels)")
        if gradient_checkpointing:
            self.model.unet.enable_gradient_checkpointing()
        self.motion_source, self.unet_init, self.weights_from = motion_source, unet_init, weights_from
        self.sample_steps, self.sample_guidance = sample_steps, tuple(sample_guidance)
        self.direction_clips, self.val_seed = direction_clips, val_seed
        self.motion_tokenizer: MotionTokenizer | None = None
        self.tokenizer_dir: str | None = None
        self.data_spec: dict | None = None
        self._weights_initialised = False
        self._direction_batch: dict[str, list[torch.Tensor]] = {}

    # ---- frozen parts ------------------------------------------------------------------------
    def frozen_prefixes(self) -> tuple[str, ...]:
        return ("latent_space.", "motion_tokenizer.")

    def train(self, mode: bool = True) -> "VideoDetokenizerStage":
        super().train(mode)
        self.latent_space.eval()
        if self.motion_tokenizer is not None:
            self.motion_tokenizer.eval()
        return self

    def _attach_tokenizer(self, directory: str) -> None:
        state, meta = read_export(directory, TOKENIZER_EXPORT)
        tokenizer = MotionTokenizer(MotionTokenizerConfig(**meta["config"]))
        try:
            tokenizer.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            raise ExportError(f"the motion tokenizer export in {directory} does not match its config: {exc}") from None
        tokenizer.requires_grad_(False).eval()
        self.motion_tokenizer = tokenizer.to(self.device)
        self.tokenizer_dir = str(Path(directory).resolve())

    def load_init_from(self, directory: str) -> None:
        self._attach_tokenizer(directory)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["motion_tokenizer_dir"] = self.tokenizer_dir  # weights stay out; resume reloads them

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        directory = checkpoint.get("motion_tokenizer_dir")
        if self.motion_tokenizer is None and directory:
            try:
                self._attach_tokenizer(directory)
            except ExportError as exc:
                raise ExportError(f"resuming needs the frozen motion tokenizer this run was trained with: {exc}. "
                                  "Restore that directory (the checkpoint holds no tokenizer weights).") from None
        super().on_load_checkpoint(checkpoint)

    # ---- set-up --------------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        # Lightning restores a checkpoint only after setup, so on resume these initialisations run and are
        # then overwritten by the checkpoint (trainer.ckpt_path is not known yet here).
        super().setup(stage)  # init_from: the motion tokenizer
        if not self._weights_initialised:
            if self.unet_init:
                rank_zero_info(f"{type(self).__name__}: U-Net from SVD weights in {self.unet_init}")
                load_svd_unet_weights(self.model.unet, self.unet_init, verbose=self.global_rank == 0)
            if self.weights_from:
                rank_zero_info(f"{type(self).__name__}: weights from the g_V export in {self.weights_from}")
                self._load_weights_from(self.weights_from)
        self._weights_initialised = True

    def _check_ready(self) -> None:
        """After any checkpoint restore: the tokenizer is there if needed and the data fits."""
        if self.motion_source == "tokenizer" and self.motion_tokenizer is None:
            raise ValueError("motion_source 'tokenizer' conditions on the motion tokenizer's reconstructions: set "
                             "init_from to the directory holding the stage-1a motion_tokenizer export "
                             "(or motion_source: raw)")
        datamodule = getattr(self.trainer, "datamodule", None)
        if datamodule is not None and getattr(datamodule, "view", None) is not None:
            self.check_view(datamodule.view)

    def on_fit_start(self) -> None:
        self._check_ready()

    def on_validation_start(self) -> None:
        if self.trainer.state.fn != TrainerFn.FITTING:  # a plain validate run (fit checks at its start)
            self._check_ready()

    def _load_weights_from(self, directory: str) -> None:
        state, _ = read_video_detokenizer(directory)
        ours = self.model.state_dict()
        missing, unexpected = sorted(set(ours) - set(state)), sorted(set(state) - set(ours))
        mismatched = sorted(k for k in set(ours) & set(state) if ours[k].shape != state[k].shape)
        if missing or unexpected or mismatched:
            raise ExportError(f"weights_from {directory} does not fit this detokenizer: missing={missing[:6]} "
                              f"unexpected={unexpected[:6]} shape mismatch={mismatched[:6]}")
        self.model.load_state_dict(state, strict=True)

    def check_view(self, view) -> None:
        """The data must be what the model and tokenizer expect; records it for the export."""
        needed = ("frame_size", "grid", "scale", "clip_frames")
        if not all(hasattr(view, name) for name in needed):
            raise ValueError(f"{type(self).__name__} trains on the `video` view (datamodules.views.VideoView), "
                             f"got {type(view).__name__}")
        grid, frames = tuple(view.grid), int(view.clip_frames)
        if self.motion_source == "tokenizer" and self.motion_tokenizer is not None:
            tok = self.motion_tokenizer.config
            if grid != (tok.height, tok.width) or frames != tok.num_frames:
                raise ValueError(f"the video view's motion is {frames}x{grid[0]}x{grid[1]} (clip_frames x grid) but "
                                 f"the motion tokenizer in {self.tokenizer_dir} reads {tok.num_frames}x{tok.height}x"
                                 f"{tok.width}: set data.view.init_args.grid to [{tok.height}, {tok.width}]")
            if float(view.scale) != TOKENIZER_SCALE:
                raise ValueError(f"the motion tokenizer reads fields at scale {TOKENIZER_SCALE}, the video view "
                                 f"delivers scale {view.scale}: set data.view.init_args.scale to {TOKENIZER_SCALE}")
        self.latent_space.latent_size(*view.frame_size)  # divisibility, with its own error
        self.data_spec = {"frame_size": tuple(view.frame_size), "num_frames": frames, "motion_grid": grid,
                          "motion_scale": float(view.scale)}

    # ---- the data path -------------------------------------------------------------------------
    @torch.no_grad()
    def condition_motion(self, motion: torch.Tensor) -> torch.Tensor:
        """The field the U-Net is conditioned on: the tokenizer's reconstruction, or the field itself."""
        if self.motion_source == "raw":
            return motion.float()
        if self.motion_tokenizer is None:
            raise RuntimeError("no motion tokenizer attached (init_from)")
        return self.motion_tokenizer.decode(self.motion_tokenizer.encode(motion.float())).float()

    @torch.no_grad()
    def encode_frames(self, frames: torch.Tensor) -> torch.Tensor:
        """uint8 [B, T, 3, H, W] -> latents [B, T, C, h, w]."""
        return self.latent_space.encode(frames.flatten(0, 1)).unflatten(0, frames.shape[:2])

    def _latents(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Clean clip latents [B, T, C, h, w] and keyframe latents [B, C, h, w] of a batch."""
        with torch.no_grad():
            return self.encode_frames(batch["frames"]), self.model.keyframe_latent(self.latent_space, batch["keyframe"])

    def _loss(self, x0: torch.Tensor, keyframe: torch.Tensor, motion: torch.Tensor,
              generator: torch.Generator | None = None) -> torch.Tensor:
        cond = self.model.conditioning(keyframe, self.condition_motion(motion), generator=generator)
        return self.model.loss(x0, cond, generator=generator)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss = self._loss(*self._latents(batch), batch["motion"])
        self.log("train/loss", loss, prog_bar=True, batch_size=batch["frames"].shape[0])
        return loss

    def _generator(self, seed: int) -> torch.Generator:
        return torch.Generator(device=self.device).manual_seed(seed)

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        size = batch["frames"].shape[0]
        x0, keyframe = self._latents(batch)
        seed = self.val_seed + 1000 * batch_idx
        self.log("val/loss", self._loss(x0, keyframe, batch["motion"], self._generator(seed)), batch_size=size,
                 sync_dist=True)
        if size > 1:  # the same noise, each clip conditioned on another clip's motion
            other = batch["motion"].roll(size // 2, dims=0)
            self.log("val/loss_other_motion", self._loss(x0, keyframe, other, self._generator(seed)),
                     batch_size=size, sync_dist=True)
        if self.global_rank == 0 and self.direction_clips > 0 and not self.trainer.sanity_checking:
            kept = sum(len(x) for x in self._direction_batch.get("keyframe", []))
            take = min(size, self.direction_clips - kept)
            if take > 0:
                for key in ("frames", "keyframe", "motion"):
                    self._direction_batch.setdefault(key, []).append(batch[key][:take].detach().cpu())

    def on_validation_epoch_end(self) -> None:
        clips, self._direction_batch = self._direction_batch, {}
        if self.trainer.sanity_checking or not clips or self.global_rank != 0:
            return
        frames, keyframe, motion = (torch.cat(clips[k]) for k in ("frames", "keyframe", "motion"))
        cond_motion = self.condition_motion(motion.to(self.device)).cpu()
        expected = [motion_field_direction(m) for m in cond_motion]
        keep = [i for i, e in enumerate(expected) if e is not None]
        if not keep:
            return
        videos = self.reconstruct(keyframe[keep].to(self.device), cond_motion[keep].to(self.device)).cpu()
        expected = [expected[i] for i in keep]
        generated = [measure_motion(v.numpy()).direction for v in videos]
        real = [measure_motion(f.numpy()).direction for f in frames[keep]]
        self.log_dict({"val/direction_agreement": direction_agreement(generated, expected),
                       "val/direction_agreement_input": direction_agreement(real, expected)}, rank_zero_only=True)

    # ---- sampling ------------------------------------------------------------------------------
    @torch.no_grad()
    def reconstruct(self, keyframe: torch.Tensor, cond_motion: torch.Tensor, seed: int | None = None) -> torch.Tensor:
        """Clips from keyframes uint8 [B, 3, H, W] and conditioning fields [B, 2, T, gh, gw] -> uint8
        [B, T, 3, H, W], with a fixed seed so repeated calls are comparable."""
        generator = self._generator(self.val_seed if seed is None else seed)
        frames = cond_motion.shape[2]
        keyframe_latent = self.model.keyframe_latent(self.latent_space, keyframe, generator=generator)
        cond = self.model.conditioning(keyframe_latent, cond_motion, generator=generator)
        latents = self.model.sample(cond, frames, num_steps=self.sample_steps, guidance=self.sample_guidance,
                                    generator=generator)
        pixels = self.latent_space.decode(latents.flatten(0, 1), num_frames=frames)
        return images_to_uint8(pixels).unflatten(0, latents.shape[:2])

    @torch.no_grad()
    def sample_videos(self, batch: dict) -> dict:
        """The batch's clips reconstructed from their keyframes and (tokenized) motion."""
        videos = self.reconstruct(batch["keyframe"], self.condition_motion(batch["motion"]))
        return {"videos": videos, "captions": list(batch.get("caption") or [])}

    # ---- export --------------------------------------------------------------------------------
    def export(self, directory: str | Path) -> None:
        if self.data_spec is None:
            raise RuntimeError("export needs the data the model was trained on (frame size, grid): run it "
                               "through a trainer with the video view, or call check_view(view) first")
        spec = VideoDetokenizerSpec(latent_space=self.latent_space_config, motion_source=self.motion_source,
                                    **self.data_spec)
        save_video_detokenizer(self.model, directory, spec, latent_space=self.latent_space)
