"""Where the detokenizers diffuse: a frozen VAE's latent space at scale, raw pixels for small runs.

Both U-Nets (keyframe g_I and video g_V, docs/design.md §6-7) only see ``encode``/``decode`` and the channel count
and down-sampling factor, so the same stage code trains on SD/SVD latents on a cluster and on 32×32 pixels
on a laptop. Images are float in [-1, 1], [N, 3, H, W]; latents are [N, C, H/f, W/f] scaled to unit-ish
variance (the VAE's ``scaling_factor``), which is what the EDM preconditioning's ``sigma_data`` assumes.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from videolavit.metrics.weights import require_directory
from videolavit.models.export import drop_source_path


def images_to_unit_range(images: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] (or float already in [-1, 1]) -> float32 in [-1, 1]."""
    if images.dtype == torch.uint8:
        return images.float().div(127.5).sub(1.0)
    return images.float()


def images_to_uint8(images: torch.Tensor) -> torch.Tensor:
    """float in [-1, 1] -> uint8 [0, 255] (values outside are clipped)."""
    return images.float().add(1.0).mul(127.5).round().clamp(0, 255).to(torch.uint8)


class LatentSpace(nn.Module):
    """Frozen map between images in [-1, 1] and the space a U-Net diffuses in."""

    channels: int
    downsample: int

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def decode(self, latents: torch.Tensor, num_frames: int | None = None) -> torch.Tensor:
        """``num_frames``: frames per video when latents are [videos * frames, ...] (temporal decoders)."""
        raise NotImplementedError

    def latent_size(self, height: int, width: int) -> tuple[int, int]:
        if height % self.downsample or width % self.downsample:
            raise ValueError(f"frame size {height}x{width} is not divisible by the latent space's "
                             f"down-sampling factor {self.downsample}")
        return height // self.downsample, width // self.downsample


class PixelSpace(LatentSpace):
    """Identity: diffuse RGB directly (tiny configs and tests), scaled so sigma_data ~ 0.5 holds."""

    def __init__(self, scale: float = 1.0):
        super().__init__()
        self.channels, self.downsample, self.scale = 3, 1, scale
        self.init_args = {"scale": float(scale)}

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return images_to_unit_range(images) * self.scale

    def decode(self, latents: torch.Tensor, num_frames: int | None = None) -> torch.Tensor:
        return (latents / self.scale).clamp(-1.0, 1.0)


class VaeLatentSpace(LatentSpace):
    """A frozen diffusers VAE loaded from a local ``save_pretrained`` directory (SD/SDXL/SVD layouts).

    ``temporal_decoder=True`` loads ``AutoencoderKLTemporalDecoder`` (SVD), whose decoder mixes frames and so
    needs ``num_frames``; encoding is per image in both. ``chunk`` bounds how many images pass the VAE at once.
    """

    def __init__(self, path: str, subfolder: str | None = "vae", temporal_decoder: bool = False,
                 chunk: int = 16, sample_posterior: bool = False):
        super().__init__()
        from diffusers import AutoencoderKL, AutoencoderKLTemporalDecoder

        self.init_args = {"path": str(Path(path).expanduser().resolve()) if path else path, "subfolder": subfolder,
                          "temporal_decoder": temporal_decoder, "chunk": chunk, "sample_posterior": sample_posterior}

        root = require_directory(path, "latent_space.init_args.path", "VAE")
        if subfolder and not (Path(root) / subfolder).is_dir():
            subfolder = None  # the directory is the VAE itself
        cls = AutoencoderKLTemporalDecoder if temporal_decoder else AutoencoderKL
        self.vae = cls.from_pretrained(str(root), subfolder=subfolder, local_files_only=True)
        self.vae.requires_grad_(False).eval()
        self.temporal_decoder, self.chunk, self.sample_posterior = temporal_decoder, chunk, sample_posterior
        self.channels = self.vae.config.latent_channels
        self.downsample = 2 ** (len(self.vae.config.block_out_channels) - 1)
        self.scaling_factor = float(self.vae.config.scaling_factor)

    def train(self, mode: bool = True) -> "VaeLatentSpace":
        super().train(mode)
        self.vae.eval()  # frozen: never switch its dropout/norm behaviour
        return self

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        images = images_to_unit_range(images).to(self.vae.dtype)
        out = []
        for part in images.split(self.chunk):
            dist = self.vae.encode(part).latent_dist
            out.append(dist.sample() if self.sample_posterior else dist.mode())
        return torch.cat(out).float() * self.scaling_factor

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, num_frames: int | None = None) -> torch.Tensor:
        latents = (latents / self.scaling_factor).to(self.vae.dtype)
        if not self.temporal_decoder:
            return torch.cat([self.vae.decode(part).sample for part in latents.split(self.chunk)]).float().clamp(-1, 1)
        if num_frames is None:
            raise ValueError("the temporal VAE decoder needs num_frames (latents are [videos * frames, C, h, w])")
        step = max(1, self.chunk // num_frames) * num_frames
        out = [self.vae.decode(part, num_frames=num_frames).sample for part in latents.split(step)]
        return torch.cat(out).float().clamp(-1, 1)


def latent_space_spec(space: LatentSpace) -> dict:
    """{"class_path", "init_args"} that rebuild ``space``: what exports record next to a U-Net."""
    args = getattr(space, "init_args", None)
    if args is None:
        raise TypeError(f"cannot record how to rebuild a {type(space).__name__}: give it an `init_args` dict")
    cls = type(space)
    return {"class_path": f"{cls.__module__}.{cls.__qualname__}", "init_args": dict(args)}


def build_latent_space(spec: dict, **overrides) -> LatentSpace:
    """A frozen latent space from ``latent_space_spec``'s record (or a YAML ``class_path``/``init_args`` dict);
    ``overrides`` replace init args (e.g. ``path=`` where the VAE lives elsewhere on this machine). Only the
    classes of :data:`LATENT_SPACES` are built: exports record this dict, and an export's JSON must never
    choose which code is imported."""
    if not isinstance(spec, dict) or "class_path" not in spec:
        raise ValueError(f"a latent space config is {{'class_path': ..., 'init_args': {{...}}}}, got {spec!r}")
    cls = LATENT_SPACES.get(str(spec["class_path"]))
    if cls is None:
        raise ValueError(f"latent space class {spec['class_path']!r} is not a videolavit LatentSpace and cannot be "
                         f"imported from a config; allowed: {', '.join(sorted(LATENT_SPACES))}")
    init_args = spec.get("init_args") or {}
    if not isinstance(init_args, dict):
        raise ValueError(f"latent space init_args must be a mapping, got {init_args!r}")
    return cls(**{**init_args, **overrides}).requires_grad_(False).eval()


LATENT_SPACES: dict[str, type[LatentSpace]] = {
    f"{cls.__module__}.{cls.__qualname__}": cls for cls in (PixelSpace, VaeLatentSpace)}


# ---- in exports ------------------------------------------------------------------------------------

VAE_SUBFOLDER = "vae"  # where a detokenizer export keeps its VAE (diffusers ``save_pretrained`` layout)
VAE_SPACE = f"{VaeLatentSpace.__module__}.{VaeLatentSpace.__qualname__}"


class LatentSpaceReferenceError(ValueError):
    """An export's latent space names a VAE outside the export directory (or one that is not there)."""


def export_latent_space(space: LatentSpace | dict, directory: str | Path) -> dict:

    """The latent-space record an export in ``directory`` keeps: no absolute path in it.

    A VAE latent space's VAE goes to ``directory/vae`` through the VAE's own ``save_pretrained`` (unless the
    VAE already lives there, e.g. an import copied it) and is recorded as the relative path ``"vae"``;
    :func:`resolve_latent_space` turns it back into a path on the reading machine.
    """
    spec = latent_space_spec(space) if isinstance(space, LatentSpace) else dict(space)
    if spec.get("class_path") != VAE_SPACE:
        return spec
    directory = Path(directory)
    args = dict(spec.get("init_args") or {})
    target = (directory / VAE_SUBFOLDER).resolve()
    source = Path(str(args.get("path") or "")).expanduser()
    if not source.is_absolute():
        source = directory / source
    if args.get("subfolder") and (source / args["subfolder"]).is_dir():
        source = source / args["subfolder"]
    if source.resolve() != target:
        vae = space.vae if isinstance(space, VaeLatentSpace) else build_latent_space(spec).vae
        target.parent.mkdir(parents=True, exist_ok=True)
        vae.save_pretrained(str(target), safe_serialization=True)
        drop_source_path(target)
    args.update(path=VAE_SUBFOLDER, subfolder=None)
    return {**spec, "init_args": args}


def resolve_latent_space(spec: dict, directory: str | Path) -> dict:
    """``spec`` as read from an export in ``directory``, its relative VAE path made absolute there.

    Absolute paths (exports written before VAEs moved into the export) are kept as they are; a relative
    path that leaves ``directory`` is a :class:`LatentSpaceReferenceError`.
    """
    if not isinstance(spec, dict) or spec.get("class_path") != VAE_SPACE:
        return spec
    args = dict(spec.get("init_args") or {})
    path = args.get("path")
    if not isinstance(path, str) or not path or Path(path).is_absolute():
        return spec
    root = Path(directory).resolve()
    resolved = (root / path).resolve()
    if resolved != root and root not in resolved.parents:
        raise LatentSpaceReferenceError(f"the latent space recorded in {directory} points at {path!r}, outside the "
                                        "export directory: a VAE reference must stay inside it (re-export it)")
    args["path"] = str(resolved)
    return {**spec, "init_args": args}
