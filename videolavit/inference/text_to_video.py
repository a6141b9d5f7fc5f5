"""Text-to-video, image-to-video and long video from trained exports (docs/design.md §7-8; no Lightning).

The chain: prompt → LLM samples each clip's ``[IMG] keyframe codes [/IMG] [MOV] motion codes [/MOV]``
(``videolavit.llm.visual_generation``: code ranges enforced, release guidance 4.0 / 7.0, fixed motion
length) → keyframe detokenizer g_I turns the keyframe codes into an image → the motion tokenizer's
decoder turns the motion codes into a motion field → video detokenizer g_V renders the clip from the
keyframe and the motion → uint8 frames. Image-to-video puts a given image's codes in the prompt and uses
the image itself as the first keyframe. Long video (``num_clips`` > 1): the LLM keeps writing clips in
one sequence, and each later keyframe starts from the previous clip's last frame, noised (release) or
DDIM-inverted (paper eq. 4) part-way along g_I's schedule, so consecutive clips join up.

Exports directory layout (what the stages' ``export_dir`` write; ``from_directory``):
``motion_tokenizer.{json,safetensors}``, ``keyframe_tokenizer.{json,safetensors}``,
``keyframe_detokenizer/``, ``video_detokenizer/`` and an LLM directory (``pretrain/`` if present, else
``instruct/``; or pass ``llm=``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F

from videolavit.diffusion.ddim import next_keyframe_start
from videolavit.llm.sequences import image_token_ids
from videolavit.llm.text_tokenizer import load_text_tokenizer
from videolavit.llm.video_codes import VideoCoder
from videolavit.llm.visual_generation import GeneratedClip, SamplingOptions, generate_clips
from videolavit.models.export import ExportError, load_export
from videolavit.models.export_names import KEYFRAME_DETOKENIZER, KEYFRAME_TOKENIZER, MOTION_TOKENIZER, VIDEO_DETOKENIZER
from videolavit.models.keyframe_detokenizer import SDXL_DDIM, load_keyframe_detokenizer
from videolavit.models.latent_space import build_latent_space, images_to_uint8, images_to_unit_range
from videolavit.models.motion_tokenizer import MotionTokenizer
from videolavit.release.layout import read_behaviour
from videolavit.models.video_detokenizer import load_video_detokenizer, read_video_detokenizer_spec

# The release generates with its pre-trained LLM; instruction tuning on conversations alone (ours too) erodes
# text-to-video (the tiny chain: the caption's direction in 4/8 generated motion fields before, 1/8 after).
LLM_DIRECTORIES = ("pretrain", "instruct")


@dataclass
class GenerationOptions:
    """Sampling settings; defaults are the release's (LLM CFG 4.0 keyframe / 7.0 motion, g_V 25 Euler steps
    with a per-frame guidance ramp 1 → 4, long-video keyframes noised at 85% of the schedule)."""

    keyframe_guidance: float = 4.0
    motion_guidance: float = 7.0
    temperature: float = 1.0
    keyframe_temperature: float | None = None  # None: ``temperature`` (see SamplingOptions)
    top_k: int | None = None
    keyframe_steps: int | None = None  # g_I steps (None: its config's)
    keyframe_image_guidance: float | None = None  # g_I CFG scale (None: its config's)
    keyframe_sampler: str | None = None  # g_I sampler: "euler" | "ddim" | "euler_ancestral" (None: its config's;
    #                                      the release's two need a discrete-time g_I, e.g. an imported one)
    video_steps: int = 25
    video_guidance: tuple[float, float] = (1.0, 4.0)
    long_video_start: Literal["noise", "invert"] = "noise"
    llm_behaviour: str | None = None  # "release" | "ours" (None: "release" for an LLM directory the import
    #                                   wrote, see videolavit.release.layout.BEHAVIOUR_FILE; else "ours")
    long_video_fraction: float = 0.85


def with_keyframe_sampler(detokenizer, sampler: str):
    """``detokenizer`` set to sample with ``sampler``; the release's samplers take the scheduler config the
    detokenizer records (an imported one), else SDXL's DDIM config."""
    diffusion = detokenizer.config.diffusion
    try:
        detokenizer.config.diffusion = dataclasses.replace(
            diffusion, sampler=sampler, scheduler=diffusion.scheduler or (None if sampler == "euler" else SDXL_DDIM))
    except ValueError as exc:
        raise ExportError(f"keyframe_sampler {sampler!r} does not fit the keyframe detokenizer: {exc}") from None
    return detokenizer


def _find_export(root: Path, name: str) -> Path:
    """An export named ``name`` directly in ``root`` or in ``root/name``."""
    for directory in (root / name, root):
        if (directory / f"{name}.json").is_file():
            return directory
    raise ExportError(f"no '{name}' export in {root} or {root / name} (run its stage with export_dir there)")


def _resize(images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    if tuple(images.shape[-2:]) == tuple(size):
        return images
    return F.interpolate(images, size=size, mode="bilinear", align_corners=False, antialias=True)


class TextToVideo:
    def __init__(self, llm, tokenizer, vocabulary, motion_tokenizer, video_coder: VideoCoder | None,
                 keyframe_detokenizer, video_detokenizer, video_spec, options: GenerationOptions | None = None, device: str = "cpu"):
        self.device = torch.device(device)
        self.llm, self.tokenizer, self.vocabulary = llm.to(self.device).eval(), tokenizer, vocabulary
        self.motion_tokenizer = motion_tokenizer.to(self.device).eval()
        # image-to-video tokenises the given image with the coder that wrote the training token shards
        self.video_coder = video_coder if video_coder is not None and video_coder.has_keyframes else None
        self.options = options or GenerationOptions()
        if self.options.llm_behaviour not in (None, "release", "ours"):
            raise ValueError(f"llm_behaviour must be 'release' or 'ours', got {self.options.llm_behaviour!r}")
        if self.options.keyframe_sampler is not None:
            keyframe_detokenizer = with_keyframe_sampler(keyframe_detokenizer, self.options.keyframe_sampler)
        self.keyframe_detokenizer = keyframe_detokenizer.to(self.device).eval()
        self.keyframe_space = build_latent_space(keyframe_detokenizer.latent_space_spec).to(self.device)
        self.video_detokenizer, self.video_spec = video_detokenizer.to(self.device).eval(), video_spec
        self.video_space = build_latent_space(video_spec.latent_space).to(self.device)
        self._check_fit()

    @classmethod
    def from_directory(cls, directory: str | Path, llm: str | Path | None = None, device: str = "cpu",
                       keyframe_backbone_weights: str | None = None, **options) -> "TextToVideo":
        """Everything from one exports directory (see the module docstring); ``options``: GenerationOptions."""
        from videolavit.inference.video_chat import load_llm, read_llm_vocabulary

        root = Path(directory)
        if not root.is_dir():
            raise ExportError(f"exports directory {root} does not exist")
        if llm is None:
            found = [root / name for name in LLM_DIRECTORIES if (root / name / "config.json").is_file()]
            if not found:
                raise ExportError(f"no LLM export in {root} ({' or '.join(LLM_DIRECTORIES)}/); pass llm=DIR")
            llm = found[0]
        vocabulary = read_llm_vocabulary(llm)
        if options.get("llm_behaviour") is None:
            options["llm_behaviour"] = read_behaviour(llm).get("llm_generation", "ours")
        motion_tokenizer = load_export(root, MOTION_TOKENIZER, expected=MotionTokenizer)  # small: before the LLM
        has_keyframe_tokenizer = (root / f"{KEYFRAME_TOKENIZER}.json").is_file()  # only image-to-video needs it
        coder = VideoCoder(vocabulary, root, root if has_keyframe_tokenizer else None,
                           keyframe_backbone_weights=keyframe_backbone_weights, device=device)
        video_dir = _find_export(root, VIDEO_DETOKENIZER)
        video_detokenizer, _ = load_video_detokenizer(video_dir)
        known = {f.name for f in fields(GenerationOptions)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise TypeError(f"unknown generation options {unknown}; known: {sorted(known)}")
        return cls(load_llm(llm), load_text_tokenizer(llm, vocabulary), vocabulary,
                   motion_tokenizer, coder,
                   load_keyframe_detokenizer(_find_export(root, KEYFRAME_DETOKENIZER)), video_detokenizer,
                   read_video_detokenizer_spec(video_dir), GenerationOptions(**options), device=device)

    def _check_fit(self) -> None:
        vocab, tok, spec = self.vocabulary, self.motion_tokenizer.config, self.video_spec
        if tok.num_codes != vocab.motion_codes:
            raise ExportError(f"the motion tokenizer has {tok.num_codes} codes, the LLM's vocabulary "
                              f"{vocab.motion_codes}")
        if self.keyframe_detokenizer.config.num_codes != vocab.visual_codes:
            raise ExportError(f"the keyframe detokenizer has {self.keyframe_detokenizer.config.num_codes} codes, "
                              f"the LLM's vocabulary {vocab.visual_codes}")
        if (tok.height, tok.width) != tuple(spec.motion_grid) or tok.num_frames != spec.num_frames:
            raise ExportError(f"the video detokenizer expects {spec.num_frames}x{spec.motion_grid} motion, the motion "
                              f"tokenizer decodes {tok.num_frames}x{(tok.height, tok.width)}")

    # ---- LLM ---------------------------------------------------------------------------------------
    def _sampling(self) -> SamplingOptions:
        o = self.options
        common = dict(motion_length=self.motion_tokenizer.num_tokens,
                      keyframe_max_length=self.keyframe_detokenizer.config.decoder.max_codes,
                      keyframe_guidance=o.keyframe_guidance, motion_guidance=o.motion_guidance,
                      temperature=o.temperature, keyframe_temperature=o.keyframe_temperature, top_k=o.top_k)
        if o.llm_behaviour == "release":
            return SamplingOptions.release(**common)
        return SamplingOptions(**common)

    def image_codes(self, image: torch.Tensor) -> list[int]:
        """Keyframe codes of an image (uint8 [3, H, W]) from the keyframe tokenizer."""
        if self.video_coder is None:
            raise ExportError("image-to-video needs the keyframe_tokenizer export next to the others")
        size = self.video_coder.keyframe_image_size()
        pixels = _resize(image[None].float().div(255.0).to(self.device), (size, size))
        return self.video_coder.image_codes(pixels)[0].tolist()

    def clip_tokens(self, prompt: str, num_clips: int = 1, image: torch.Tensor | None = None,
                    generator: torch.Generator | None = None) -> list[GeneratedClip]:
        text = self.tokenizer(prompt, add_special_tokens=False, split_special_tokens=True)["input_ids"]
        # the release's prompt is the text alone (then [IMG]); ours starts with BOS, as the LLM trains
        ids = list(text) if self.options.llm_behaviour == "release" else [self.tokenizer.bos_token_id, *text]
        if image is not None:
            ids += image_token_ids(self.image_codes(image), self.vocabulary) + [self.vocabulary.motion_start_id]
        return generate_clips(self.llm, self.vocabulary, ids, num_clips, self._sampling(), generator=generator)

    # ---- detokenizers ------------------------------------------------------------------------------
    def keyframe(self, codes: list[int], generator: torch.Generator, previous_frame: torch.Tensor | None = None
                 ) -> torch.Tensor:
        """g_I: keyframe codes -> image in [-1, 1] [1, 3, S, S]; from the previous clip's last frame if given."""
        kdet, o = self.keyframe_detokenizer, self.options
        cond = kdet.conditioning(torch.tensor([codes], device=self.device))
        x_init = sigmas = None
        if previous_frame is not None:
            latent = self.keyframe_space.encode(_resize(previous_frame, kdet.config.image_hw))
            start = next_keyframe_start(latent, kdet.sigmas(o.keyframe_steps, self.device),
                                        strategy=o.long_video_start, fraction=o.long_video_fraction,
                                        denoise=kdet.denoise_fn(cond, o.keyframe_image_guidance), generator=generator)
            x_init, sigmas = start.x, start.sigmas
        latents = kdet.sample(cond, num_steps=o.keyframe_steps, guidance_scale=o.keyframe_image_guidance,
                              generator=generator, x_init=x_init, sigmas=sigmas)
        return self.keyframe_space.decode(latents)

    def motion_field(self, motion_codes: list[int]) -> torch.Tensor:
        """Motion codes -> the motion tokenizer's field [2, T, H, W] (x right, y down; tokenizer scale)."""
        return self.motion_tokenizer.decode(torch.tensor([motion_codes], device=self.device))[0]

    def clip(self, keyframe: torch.Tensor, motion_codes: list[int], generator: torch.Generator) -> torch.Tensor:
        """g_V: keyframe in [-1, 1] [1, 3, H, W] + motion codes -> frames in [-1, 1] [T, 3, H, W]."""
        spec, o = self.video_spec, self.options
        motion = self.motion_field(motion_codes)[None]
        detokenizer = self.video_detokenizer
        latent = detokenizer.keyframe_latent(self.video_space, _resize(keyframe, spec.frame_size), generator=generator)
        cond = detokenizer.conditioning(latent, motion, generator=generator)
        latents = detokenizer.sample(cond, spec.num_frames, num_steps=o.video_steps,
                                     guidance=tuple(o.video_guidance), generator=generator)
        return detokenizer.decode(self.video_space, latents)

    # ---- public API --------------------------------------------------------------------------------
    def generate(self, prompt: str, num_clips: int = 1, image: torch.Tensor | None = None,
                 seed: int = 0) -> torch.Tensor:
        """uint8 frames [num_clips * T, 3, H, W] at the video detokenizer's frame size (6 fps)."""
        return self.generate_with_tokens(prompt, num_clips, image, seed)[0]

    @torch.no_grad()
    def generate_with_tokens(self, prompt: str, num_clips: int = 1, image: torch.Tensor | None = None,
                             seed: int = 0) -> tuple[torch.Tensor, list[GeneratedClip]]:
        """As :meth:`generate`, plus the codes the LLM wrote for each clip (to tell its errors from g_I's/g_V's)."""
        llm_generator = torch.Generator().manual_seed(seed)
        generator = torch.Generator(self.device).manual_seed(seed + 1)
        clips = self.clip_tokens(prompt, num_clips, image, llm_generator)
        frames, previous = [], None
        for index, tokens in enumerate(clips):
            if index == 0 and image is not None:
                keyframe = images_to_unit_range(image[None].to(self.device))
            else:
                keyframe = self.keyframe(tokens.keyframe, generator, previous)
            clip = self.clip(keyframe, tokens.motion, generator)
            previous = clip[-1:]
            frames.append(images_to_uint8(clip))
        return torch.cat(frames).cpu(), clips

    def __call__(self, prompts: list[str], generator: torch.Generator | None = None) -> torch.Tensor:
        """One clip per prompt -> uint8 [B, T, 3, H, W] (the evaluation protocol's interface)."""
        seeds = (torch.randint(0, 2**31 - 1, (len(prompts),), generator=generator).tolist() if generator is not None
                 else list(range(len(prompts))))
        return torch.stack([self.generate(prompt, seed=seed) for prompt, seed in zip(prompts, seeds)])
