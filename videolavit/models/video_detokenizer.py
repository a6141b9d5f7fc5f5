"""The video detokenizer g_V (docs/design.md §7, paper §3.2 eq. 3): a keyframe plus a motion field -> a video clip.

Three parts: the motion-condition encoder turns the clip's motion field into per-frame context tokens; the
3-D U-Net (``VideoUNet``) sees each frame's noisy latent next to the keyframe latent and the motion field
and cross-attends to the context; the EDM denoiser wraps the U-Net (preconditioning and loss weighting from
one ``DenoiserScaling``, so they are consistent), trained at log σ ~ N(p_mean, p_std²) and sampled with
Euler steps on a Karras schedule under a per-frame classifier-free guidance ramp.

``load_video_detokenizer`` and ``VideoDetokenizer.conditioning`` / ``sample`` are the API the generation pipeline
uses (example in ``VideoDetokenizer``'s docstring). Where our choices differ from the release's (motion resizing,
keyframe latent scale, where the augmentation noise goes, VAE decode chunks), the config holds both and
``RELEASE_BEHAVIOUR`` lists the release's, so imports of the released weights reproduce its outputs
(the switches: ``VideoDetokenizerConfig``).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from videolavit.diffusion.denoiser import Denoiser, append_dims
from videolavit.diffusion.denoiser_scaling import DenoiserScaling
from videolavit.diffusion.edm import DiffusionLoss, DiffusionLossTerms
from videolavit.diffusion.guidance import GuidedDenoiser, LinearFrameGuidance, unconditional
from videolavit.diffusion.samplers import EulerSampler, KarrasSchedule, initial_latents
from videolavit.diffusion.parameterization import build_parameterization, scaling_name
from videolavit.models.export import (
    ExportError,
    NonFiniteExportError,
    check_export_class,
    non_finite_tensors,
    read_diffusers_config,
    read_diffusers_weights,
    read_export,
    save_diffusers_scheduler,
    save_diffusers_subfolder,
    save_export,
)
from videolavit.models.export_names import VIDEO_DETOKENIZER
from videolavit.models.latent_space import (
    LatentSpace,
    LatentSpaceReferenceError,
    export_latent_space,
    images_to_unit_range,
    resolve_latent_space,
)
from videolavit.models.motion_condition_encoder import MotionConditionEncoder, MotionConditionEncoderConfig
from videolavit.models.video_unet import VideoUNet, VideoUNetConfig

EXPORT_NAME = VIDEO_DETOKENIZER
# what the release's classifier-free guidance zeroes for the unconditional branch (the time ids stay)
UNCONDITIONAL_KEYS = ("keyframe_latent", "motion_field", "motion_context")
RESIDUAL_BASE = "residual_base"  # cond key of the clean keyframe latent [b, C, h, w] (keyframe_residual only)
SCALINGS = ("v_edm", "edm")  # the continuous-σ names of videolavit.diffusion.parameterization
MOTION_RESIZE_MODES = ("bicubic", "area")
NOISE_AUG_SPACES = ("pixels", "latent")
RELEASE_DECODE_CHUNK_FRAMES = 8


@dataclass
class VideoDetokenizerConfig:
    """Every size and constant of g_V; defaults are the release model (SVD-xt U-Net, 16×16 motion input).

    Where ours and the release differ, the config chooses (``RELEASE_BEHAVIOUR`` lists the release's; imports of
    the released weights set it, and then the outputs equal the release code's on the same weights):

    * ``motion_resize``: ``"bicubic"`` (release) resizes the motion field per frame bicubically to the latent
      size, and the encoder's input bicubically from there; ``"area"`` (ours) resizes the given field straight
      to each size, area-averaging when shrinking (no overshoot at motion edges).
    * ``keyframe_latent_scale``: the release conditions on the VAE's *unscaled* latent (1 / scaling_factor of
      what the latent space returns); ours on the scaled one (1.0), the same units as the diffused latents.
    * ``noise_aug_space``: the release adds the 0.02 augmentation noise to the keyframe pixels before the VAE
      (``keyframe_latent`` does it), ours to the latent (``conditioning`` does it).
    * ``decode_chunk_frames``: the release decodes its temporal VAE 8 frames at a time (``decode``); ours all
      of a clip's frames in one call (None).
    * The U-Net's ``temporal_context_resize`` (``VideoUNetConfig``): release ``"nearest"``, ours ``"bilinear"``.
    """

    unet: VideoUNetConfig = field(default_factory=VideoUNetConfig)
    motion_encoder: MotionConditionEncoderConfig = field(default_factory=MotionConditionEncoderConfig)
    motion_gain: float = 0.1  # encoder and U-Net see gain x the motion given to ``conditioning``: 0.1 turns the
    #                           tokenizer scale (x10) back into the standardised field (unit std on real video)
    scaling: str = "v_edm"  # "v_edm": SVD's v-prediction, EDM c_noise (σ_data 1, latents) | "edm": EDMScaling
    sigma_data: float = 0.5  # data std for scaling "edm" (pixels in [-1, 1])
    p_mean: float = 1.0  # training noise levels: log σ ~ N(p_mean, p_std²) (paper)
    p_std: float = 1.2
    sigma_min: float = 0.002  # Karras sampling schedule (SVD / release)
    sigma_max: float = 700.0
    rho: float = 7.0
    fps_id: float = 6.0  # added time ids, fed to the U-Net as given (release: 6, 127, 0.02)
    motion_bucket_id: float = 127.0
    noise_aug_strength: float = 0.02  # also the std of the noise added to the keyframe latent
    uncond_prob: float = 0.1  # training samples conditioned on nothing (the zeroed keys), which CFG needs
    keyframe_residual: bool = False  # diffuse clip - keyframe latent (the release: False). For models trained
    #                                  from scratch at small scale: the static part of a clip is then given, and
    #                                  training goes to what moves (set sigma_data to the residual's std)
    motion_resize: str = "area"  # "bicubic" (release) | "area" (ours; class docstring)
    keyframe_latent_scale: float = 1.0  # x the latent space's keyframe latent (release: 1 / VAE scaling_factor)
    noise_aug_space: str = "latent"  # where the augmentation noise goes: "pixels" (release) | "latent" (ours)
    decode_chunk_frames: int | None = None  # frames per temporal-VAE call in ``decode`` (release 8; None: a clip)

    def __post_init__(self):
        if isinstance(self.unet, dict):
            self.unet = VideoUNetConfig(**self.unet)
        if isinstance(self.motion_encoder, dict):
            self.motion_encoder = MotionConditionEncoderConfig(**self.motion_encoder)
        u, e = self.unet, self.motion_encoder
        if u.cross_attention_dim != e.out_dim:
            raise ValueError(f"the U-Net's cross_attention_dim ({u.cross_attention_dim}) must equal the motion "
                             f"encoder's out_dim ({e.out_dim})")
        if tuple(u.motion_grid) != (e.height, e.width):
            raise ValueError(f"the U-Net's motion_grid {tuple(u.motion_grid)} must be the motion encoder's grid "
                             f"({e.height}, {e.width})")
        if u.motion_channels != e.in_channels:
            raise ValueError(f"motion channels differ: U-Net {u.motion_channels}, encoder {e.in_channels}")
        self.scaling = scaling_name(self.scaling, SCALINGS, "scaling")  # "v" of earlier exports: "v_edm"
        if not 0.0 <= self.uncond_prob < 1.0:
            raise ValueError(f"uncond_prob must be in [0, 1), got {self.uncond_prob}")
        if self.motion_gain <= 0:
            raise ValueError(f"motion_gain must be positive, got {self.motion_gain}")
        if self.motion_resize not in MOTION_RESIZE_MODES:
            raise ValueError(f"motion_resize must be one of {MOTION_RESIZE_MODES}, got {self.motion_resize!r}")
        if self.noise_aug_space not in NOISE_AUG_SPACES:
            raise ValueError(f"noise_aug_space must be one of {NOISE_AUG_SPACES}, got {self.noise_aug_space!r}")
        if self.keyframe_latent_scale <= 0:
            raise ValueError(f"keyframe_latent_scale must be positive, got {self.keyframe_latent_scale}")
        if self.decode_chunk_frames is not None and self.decode_chunk_frames < 1:
            raise ValueError(f"decode_chunk_frames must be positive or None, got {self.decode_chunk_frames}")

    @property
    def is_release(self) -> bool:
        """Whether every behaviour switch is the release's (``release_behaviour``)."""
        return all(getattr(self, k) == v for k, v in RELEASE_BEHAVIOUR.items() if k != "keyframe_latent_scale") \
            and self.unet.temporal_context_resize == "nearest" and self.keyframe_latent_scale != 1.0


# the release's choice for each behaviour switch (keyframe_latent_scale is 1 / the VAE's scaling factor)
RELEASE_BEHAVIOUR = {"motion_resize": "bicubic", "noise_aug_strength": 0.02, "noise_aug_space": "pixels",
                     "decode_chunk_frames": RELEASE_DECODE_CHUNK_FRAMES, "keyframe_latent_scale": None}


def release_behaviour(config: VideoDetokenizerConfig, vae_scaling_factor: float) -> VideoDetokenizerConfig:
    """``config`` with every behaviour the release's (``VideoDetokenizerConfig``); sizes unchanged."""
    if vae_scaling_factor <= 0:
        raise ValueError(f"vae_scaling_factor must be positive, got {vae_scaling_factor}")
    switches = {k: v for k, v in RELEASE_BEHAVIOUR.items() if k != "keyframe_latent_scale"}
    unet = dataclasses.replace(config.unet, temporal_context_resize="nearest")
    return dataclasses.replace(config, unet=unet, keyframe_latent_scale=1.0 / float(vae_scaling_factor), **switches)


def _resize_motion(motion: torch.Tensor, size: tuple[int, int], mode: str = "area") -> torch.Tensor:
    """[b, 2, T, gh, gw] -> [b, 2, T, *size], per frame: "bicubic" (the release's, float32), or "area"
    (area when shrinking, linear when growing)."""
    if mode == "bicubic":
        batch, channels, frames, height, width = motion.shape
        flat = motion.permute(0, 2, 1, 3, 4).reshape(batch * frames, channels, height, width)
        flat = F.interpolate(flat.float(), size=tuple(size), mode="bicubic")
        return flat.reshape(batch, frames, channels, *size).permute(0, 2, 1, 3, 4).to(motion.dtype)
    if tuple(motion.shape[-2:]) == tuple(size):
        return motion
    frames = motion.shape[2]
    shrink = size[0] <= motion.shape[-2] and size[1] <= motion.shape[-1]
    if shrink:
        return F.interpolate(motion, size=(frames, *size), mode="area")
    return F.interpolate(motion, size=(frames, *size), mode="trilinear", align_corners=False)


class VideoDetokenizer(nn.Module):
    """Motion-condition encoder + video U-Net + EDM denoiser (module docstring).

    This is the API the generation pipeline uses::

        model, latent_space_config = load_video_detokenizer(export_dir)
        cond = model.conditioning(keyframe_latent, motion)     # [b, C, h, w], [b, 2, T, gh, gw]
        latents = model.sample(cond, T, generator=g)          # [b, T, C, h, w]

    ``motion`` is at the scale recorded in the export (``read_video_detokenizer_spec(dir).motion_scale``:
    10 = the tokenizer's, so a motion tokenizer's ``decode`` output goes in as it is); the spec also gives the
    frame size, clip length and motion grid the model was trained with.
    """

    def __init__(self, config: VideoDetokenizerConfig | None = None):
        super().__init__()
        self.config = config = config or VideoDetokenizerConfig()
        self.motion_encoder = MotionConditionEncoder(config.motion_encoder)
        self.unet = VideoUNet(config.unet)
        parts = build_parameterization(config.scaling, sigma_data=config.sigma_data, train_sigmas="log_normal",
                                       p_mean=config.p_mean, p_std=config.p_std)
        self.scaling: DenoiserScaling = parts.scaling
        self.diffusion_loss = DiffusionLoss(parts.sigma_sampler, parts.loss_weighting)
        self.schedule = KarrasSchedule(config.sigma_min, config.sigma_max, config.rho)

    @property
    def latent_channels(self) -> int:
        return self.config.unet.latent_channels

    @property
    def denoiser(self) -> Denoiser:
        """D(x, σ, **cond) over this model's network (no parameters of its own)."""
        return Denoiser(self._network, self.scaling)

    def _network(self, x: torch.Tensor, c_noise: torch.Tensor, *, keyframe_latent: torch.Tensor,
                 motion_field: torch.Tensor, motion_context: torch.Tensor,
                 added_time_ids: torch.Tensor) -> torch.Tensor:
        # x [b, T, C, h, w] (scaled by c_in); per frame: noisy ‖ keyframe ‖ motion field -> U-Net
        frames = x.shape[1]
        keyframe = keyframe_latent.unsqueeze(1).expand(-1, frames, -1, -1, -1)
        sample = torch.cat([x, keyframe.to(x.dtype), motion_field.to(x.dtype)], dim=2)
        return self.unet(sample, c_noise, motion_context, added_time_ids)

    # ---- conditioning --------------------------------------------------------------------------
    def conditioning(self, keyframe_latent: torch.Tensor, motion: torch.Tensor, *,
                     generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """keyframe_latent [b, C, h, w] (from ``keyframe_latent``), motion [b, 2, T, gh, gw] (at the export's
        ``motion_scale``) -> the U-Net's conditioning: ``keyframe_latent`` (noise-augmented here when
        ``noise_aug_space`` is "latent"), ``motion_field`` [b, T, 2, h, w] (x ``motion_gain``, at latent
        size), ``motion_context`` [b, T, N, D], ``added_time_ids`` [b, 3]."""
        c = self.config
        if keyframe_latent.dim() != 4 or keyframe_latent.shape[1] != self.latent_channels:
            raise ValueError(f"keyframe_latent must be [batch, {self.latent_channels}, h, w], "
                             f"got {list(keyframe_latent.shape)}")
        if (motion.dim() != 5 or motion.shape[1] != c.unet.motion_channels
                or motion.shape[0] != keyframe_latent.shape[0]):
            raise ValueError(f"motion must be [{keyframe_latent.shape[0]}, {c.unet.motion_channels}, frames, gh, gw], "
                             f"got {list(motion.shape)}")
        batch, _, height, width = keyframe_latent.shape
        grid = (c.motion_encoder.height, c.motion_encoder.width)
        if c.motion_resize == "bicubic":  # the release: to the latent size, then scaled, then to the grid
            at_latent = _resize_motion(motion.float(), (height, width), "bicubic") * c.motion_gain
            field_, encoder_input = at_latent, _resize_motion(at_latent, grid, "bicubic")
        else:
            motion = motion.float() * c.motion_gain
            field_, encoder_input = _resize_motion(motion, (height, width)), _resize_motion(motion, grid)
        field_ = field_.permute(0, 2, 1, 3, 4)  # [b, T, 2, h, w]
        context = self.motion_encoder(encoder_input)
        keyframe = keyframe_latent.float()
        if c.noise_aug_strength > 0 and c.noise_aug_space == "latent":
            noise = torch.randn(keyframe.shape, generator=generator, device=keyframe.device, dtype=keyframe.dtype)
            keyframe = keyframe + c.noise_aug_strength * noise
        time_ids = torch.tensor([c.fps_id, c.motion_bucket_id, c.noise_aug_strength], device=keyframe.device)
        cond = {"keyframe_latent": keyframe, "motion_field": field_.contiguous(), "motion_context": context,
                "added_time_ids": time_ids.expand(batch, -1)}
        if c.keyframe_residual:
            cond[RESIDUAL_BASE] = keyframe_latent.float()
        return cond

    @torch.no_grad()
    def keyframe_latent(self, latent_space, keyframe: torch.Tensor, *,
                        generator: torch.Generator | None = None) -> torch.Tensor:
        """Keyframe images (uint8, or float in [-1, 1]) [b, 3, H, W] -> the latent ``conditioning`` takes: encoded by the
        (frozen) ``latent_space``, times ``keyframe_latent_scale``; with ``noise_aug_space`` "pixels" the
        augmentation noise is added to the pixels first (the release)."""
        c = self.config
        pixels = images_to_unit_range(keyframe)  # uint8 or [-1, 1]
        if c.noise_aug_strength > 0 and c.noise_aug_space == "pixels":
            noise = torch.randn(pixels.shape, generator=generator, device=pixels.device, dtype=pixels.dtype)
            pixels = pixels + c.noise_aug_strength * noise
        latent = latent_space.encode(pixels).float()
        return latent if c.keyframe_latent_scale == 1.0 else latent * c.keyframe_latent_scale

    @torch.no_grad()
    def decode(self, latent_space, latents: torch.Tensor) -> torch.Tensor:
        """Sampled latents [b, T, C, h, w] -> frames in [-1, 1] [b*T, 3, H, W]; a temporal VAE sees
        ``decode_chunk_frames`` frames per call (the release: 8), or a whole clip (None)."""
        frames = latents.shape[1]
        chunk = self.config.decode_chunk_frames or frames
        flat = latents.flatten(0, 1)
        if chunk >= frames:
            return latent_space.decode(flat, num_frames=frames)
        return torch.cat([latent_space.decode(part, num_frames=part.shape[0]) for part in flat.split(chunk)])

    @staticmethod
    def split_residual_base(cond: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
        """(the U-Net's conditioning, the residual base [b, 1, C, h, w] or None)."""
        base = cond.get(RESIDUAL_BASE)
        network_cond = {k: v for k, v in cond.items() if k != RESIDUAL_BASE}
        return network_cond, None if base is None else base.unsqueeze(1)

    def unconditional(self, cond: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The release's unconditional branch: keyframe latent, motion field and motion context zeroed."""
        return unconditional(cond, UNCONDITIONAL_KEYS)

    # ---- training ------------------------------------------------------------------------------
    def loss_terms(self, x0_latents: torch.Tensor, cond: dict[str, torch.Tensor], *,
                   generator: torch.Generator | None = None) -> DiffusionLossTerms:
        """EDM loss terms for clean latents [b, T, C, h, w]; in training mode a fraction ``uncond_prob`` of
        the samples are trained unconditionally (what guidance needs at inference)."""
        field_ = cond["motion_field"]
        if (x0_latents.dim() != 5 or x0_latents.shape[:2] != field_.shape[:2]
                or x0_latents.shape[-2:] != field_.shape[-2:]):
            raise ValueError(f"x0_latents must be [batch, frames, C, h, w] matching the conditioning "
                             f"{list(field_.shape[:2])} x {list(field_.shape[-2:])}, got {list(x0_latents.shape)}")
        if self.training and self.config.uncond_prob > 0:
            draw = torch.rand(x0_latents.shape[0], generator=generator, device=x0_latents.device)
            drop = draw < self.config.uncond_prob
            cond = {k: torch.where(append_dims(drop, v.ndim), torch.zeros_like(v), v) if k in UNCONDITIONAL_KEYS else v
                    for k, v in cond.items()}
        cond, base = self.split_residual_base(cond)
        x0 = x0_latents.float() if base is None else x0_latents.float() - base
        return self.diffusion_loss.terms(self.denoiser, x0, cond, generator=generator)

    def loss(self, x0_latents: torch.Tensor, cond: dict[str, torch.Tensor], *,
             generator: torch.Generator | None = None) -> torch.Tensor:
        """Scalar EDM loss (see ``loss_terms``)."""
        return self.loss_terms(x0_latents, cond, generator=generator).loss

    # ---- sampling ------------------------------------------------------------------------------
    @torch.no_grad()
    def sample(self, cond: dict[str, torch.Tensor], num_frames: int, *, num_steps: int = 25,
               guidance: tuple[float, float] | Callable | None = (1.0, 4.0),
               generator: torch.Generator | None = None, x_init: torch.Tensor | None = None,
               sigmas: torch.Tensor | None = None) -> torch.Tensor:
        """Euler sampling on the Karras schedule -> latents [b, T, C, h, w].

        guidance: (first, last) scale of ``LinearFrameGuidance`` (release: 1 -> 4), any guidance rule, or None
        (conditional only; also what (1, 1) amounts to). ``x_init``/``sigmas``: start part-way (long video).
        ``generator`` must live on the model's device.
        """
        keyframe = cond["keyframe_latent"]
        if cond["motion_field"].shape[1] != num_frames:
            raise ValueError(f"the conditioning holds {cond['motion_field'].shape[1]} frames of motion, "
                             f"asked for {num_frames}")
        shape = (keyframe.shape[0], num_frames, *keyframe.shape[1:])
        if isinstance(guidance, (tuple, list)):
            guidance = None if tuple(float(g) for g in guidance) == (1.0, 1.0) else LinearFrameGuidance(*guidance)
        denoiser = self.denoiser
        cond, base = self.split_residual_base(cond)
        if guidance is None:
            def denoise(x, sigma):
                return denoiser(x, sigma, **cond)
        else:
            denoise = GuidedDenoiser(denoiser, guidance, cond, self.unconditional(cond))
        sampler = EulerSampler(num_steps, self.schedule)
        sigmas = sampler.sigmas(keyframe.device) if sigmas is None else sigmas.to(keyframe.device)
        if x_init is None:
            x = initial_latents(shape, float(sigmas[0]), generator=generator, device=keyframe.device)
        else:
            if tuple(x_init.shape) != shape:
                raise ValueError(f"x_init must be {list(shape)}, got {list(x_init.shape)}")
            x = x_init.float() if base is None else x_init.float() - base
        out = sampler(denoise, x, sigmas=sigmas, generator=generator)
        return out if base is None else out + base


# ---- export ----------------------------------------------------------------------------------------

@dataclass
class VideoDetokenizerSpec:
    """What an exported g_V expects, recorded next to its weights."""

    latent_space: dict  # {"class_path": ..., "init_args": {...}} of its (frozen) latent space
    frame_size: tuple[int, int]  # (H, W) of the frames it was trained on
    num_frames: int  # frames per clip
    motion_grid: tuple[int, int]  # (gh, gw) of the motion fields it was conditioned on
    motion_scale: float  # their scale (10: the motion tokenizer's)
    motion_source: str = "tokenizer"  # "tokenizer": trained on tokenizer reconstructions | "raw"

    def __post_init__(self):
        self.frame_size, self.motion_grid = tuple(self.frame_size), tuple(self.motion_grid)


UNET_SUBFOLDER = "unet"  # VideoUNet.save_pretrained layout
SCHEDULER_SUBFOLDER = "scheduler"
UNET_PREFIX = "unet."  # the U-Net's keys in the detokenizer's state dict


def diffusers_scheduler_config(config: VideoDetokenizerConfig) -> dict:
    """The diffusers scheduler that samples like ``config`` (written to ``scheduler/`` for diffusers users; our
    sampler reads the JSON's config): SVD's Euler scheduler (v-prediction, Karras σ) or EDM's."""
    if config.scaling == "v_edm":
        return {"_class_name": "EulerDiscreteScheduler", "prediction_type": "v_prediction", "use_karras_sigmas": True,
                "sigma_min": config.sigma_min, "sigma_max": config.sigma_max, "timestep_type": "continuous"}
    return {"_class_name": "EDMEulerScheduler", "sigma_min": config.sigma_min, "sigma_max": config.sigma_max,
            "sigma_data": config.sigma_data, "rho": config.rho, "prediction_type": "epsilon"}


def save_video_detokenizer(model: VideoDetokenizer, directory: str | Path, spec: VideoDetokenizerSpec,
                           latent_space: LatentSpace | None = None) -> Path:
    """Write g_V's diffusers-style export directory; returns the path of ``video_detokenizer.safetensors``.

    ``unet/``: the U-Net by ``VideoUNet.save_pretrained`` (``VideoUNet.from_pretrained`` loads it alone);
    ``scheduler/``: the matching diffusers scheduler; ``vae/``: the VAE when the latent space is one;
    ``video_detokenizer.{safetensors,json}``: the motion-condition encoder, the config and ``spec`` (its latent
    space with relative paths only). ``latent_space``: the built space of ``spec.latent_space`` if at hand (its
    VAE is then saved without loading it again). Nothing is written when a tensor is not finite.
    """
    directory = Path(directory)
    bad = non_finite_tensors(dict(model.state_dict()))
    if bad:
        raise NonFiniteExportError(f"refusing to export '{EXPORT_NAME}' to {directory}: {len(bad)} tensor(s) hold "
                                   f"NaN or Inf ({', '.join(bad[:8])}); the previous export, if any, is left as it was")
    save_diffusers_subfolder(model.unet, directory, UNET_SUBFOLDER)
    save_diffusers_scheduler(diffusers_scheduler_config(model.config), directory, SCHEDULER_SUBFOLDER)
    recorded = export_latent_space(latent_space if latent_space is not None else spec.latent_space, directory)
    spec = dataclasses.replace(spec, latent_space=recorded)
    return save_export(model, directory, EXPORT_NAME, model.config, exclude=(UNET_PREFIX,),
                       extra={"spec": dataclasses.asdict(spec), "unet": UNET_SUBFOLDER, "scheduler": SCHEDULER_SUBFOLDER})


def read_video_detokenizer_spec(directory: str | Path) -> VideoDetokenizerSpec:
    """What the export expects; its latent space's VAE (inside the export) resolved to a path on this machine."""
    path = Path(directory) / f"{EXPORT_NAME}.json"
    if not path.is_file():
        raise ExportError(f"export '{EXPORT_NAME}' is incomplete: {path} does not exist")
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise ExportError(f"export '{EXPORT_NAME}': cannot read {path} as JSON ({exc}); re-export it") from None
    spec = (record.get("extra") or {}).get("spec") if isinstance(record, dict) else None
    if not isinstance(spec, dict):
        raise ExportError(f"export '{EXPORT_NAME}' in {directory} records no spec (latent space, frame size, ...)")
    try:
        spec = VideoDetokenizerSpec(**spec)
    except (TypeError, ValueError) as exc:
        raise ExportError(f"export '{EXPORT_NAME}' in {directory}: its spec is not a VideoDetokenizerSpec ({exc})") from None
    try:
        spec.latent_space = resolve_latent_space(spec.latent_space, directory)
    except LatentSpaceReferenceError as exc:
        raise ExportError(str(exc)) from None
    return spec


def read_video_detokenizer(directory: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """``(state_dict of the whole VideoDetokenizer, meta)`` of an export, either layout, without building it.

    The diffusers-style directory's ``unet/`` is read back under ``unet.``; an old single-file export
    (everything in ``video_detokenizer.safetensors``) is read as it is.
    """
    state, meta = read_export(directory, EXPORT_NAME)
    check_export_class(meta, VideoDetokenizer, f"export '{EXPORT_NAME}' in {directory}")
    subfolder = (meta.get("extra") or {}).get("unet")
    if subfolder is None:  # the single-file layout
        return state, meta
    if subfolder != UNET_SUBFOLDER:
        raise ExportError(f"{directory}/{EXPORT_NAME}.json names U-Net folder {subfolder!r}; the only one it may name "
                          f"is {UNET_SUBFOLDER!r}")
    if any(k.startswith(UNET_PREFIX) for k in state):
        raise ExportError(f"{directory}/{EXPORT_NAME}.safetensors holds U-Net tensors although the U-Net is in "
                          f"{subfolder}/; re-export it")
    unet_dir = Path(directory) / subfolder
    recorded = read_diffusers_config(unet_dir)
    try:
        expected = VideoUNetConfig(**(meta.get("config") or {}).get("unet", {}))
        theirs = VideoUNetConfig(**{f.name: recorded[f.name] for f in dataclasses.fields(VideoUNetConfig)
                                    if f.name in recorded})
    except (TypeError, ValueError) as exc:
        raise ExportError(f"{unet_dir}/config.json or {EXPORT_NAME}.json holds no VideoUNetConfig ({exc}); "
                          "re-export it") from None
    if theirs != expected:
        differ = [f.name for f in dataclasses.fields(VideoUNetConfig) if getattr(theirs, f.name) != getattr(expected, f.name)]
        raise ExportError(f"{unet_dir}/config.json does not match {EXPORT_NAME}.json's U-Net config: {differ[:8]} "
                          "differ; re-export it")
    state.update({UNET_PREFIX + k: v for k, v in read_diffusers_weights(unet_dir).items()})
    return state, meta


def load_video_detokenizer(directory: str | Path, map_location: str | torch.device = "cpu"
                           ) -> tuple[VideoDetokenizer, dict]:
    """Rebuild g_V from a stage export (either layout) -> (model in eval mode, latent space config for
    ``build_latent_space``).

    The rest of what it expects (frame size, clip length, motion grid and scale) is
    ``read_video_detokenizer_spec(directory)``.
    """
    spec = read_video_detokenizer_spec(directory)
    state, meta = read_video_detokenizer(directory)
    source = f"export '{EXPORT_NAME}' in {directory}"
    try:
        model = VideoDetokenizer(VideoDetokenizerConfig(**meta.get("config", {})))
        missing, unexpected = model.load_state_dict(state, strict=False)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise ExportError(f"{source} does not build the video detokenizer: {exc}") from None
    if missing or unexpected:
        raise ExportError(f"{source} does not match the video detokenizer: missing={sorted(missing)[:8]} "
                          f"unexpected={sorted(unexpected)[:8]}")
    return model.to(map_location).eval(), dict(spec.latent_space)
