"""CLIPSIM (Wu et al. 2021): how well generated videos match their captions, by CLIP.

Each frame and the caption are embedded by CLIP (ViT-B/16 at 224 px in the paper's evaluation); the
score is their cosine similarity, averaged over the frames of a video and then over videos. It is the
raw cosine (≈ 0.30 for good models), not the ×100 "CLIP score". The state is the sum of per-video
scores and their count, both reduced by summation across ranks.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics import Metric

from videolavit.metrics.weights import FrozenNetwork, read_json, require_directory

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class ClipImagePreprocessing:
    """CLIP's image pipeline on tensors: shorter side → ``size`` (bicubic, antialiased like PIL),
    centre crop ``crop``×``crop``, [0, 1] → normalised by ``mean``/``std``."""

    size: int = 224
    crop: int = 224
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD

    @classmethod
    def from_directory(cls, directory: Path, image_size: int) -> "ClipImagePreprocessing":
        """Read ``preprocessor_config.json`` when present; CLIP defaults at the model's image size otherwise."""
        config = read_json(directory / "preprocessor_config.json")
        size = config.get("size", image_size)
        size = size.get("shortest_edge", size.get("height", image_size)) if isinstance(size, dict) else size
        crop = config.get("crop_size", size)
        crop = crop.get("height", size) if isinstance(crop, dict) else crop
        return cls(size=int(size), crop=int(crop), mean=tuple(config.get("image_mean", CLIP_MEAN)),
                   std=tuple(config.get("image_std", CLIP_STD)))

    def __call__(self, frames: Tensor) -> Tensor:
        """Frames [N, 3, H, W] RGB in [-1, 1] → pixel values [N, 3, crop, crop]."""
        frames = (frames.float().clamp(-1.0, 1.0) + 1.0) / 2.0
        height, width = frames.shape[-2:]
        scale = self.size / min(height, width)
        target = (max(self.size, round(height * scale)), max(self.size, round(width * scale)))
        if target != (height, width):
            frames = F.interpolate(frames, size=target, mode="bicubic", align_corners=False, antialias=True)
            frames = frames.clamp(0.0, 1.0)
        top, left = (target[0] - self.crop) // 2, (target[1] - self.crop) // 2
        frames = frames[..., top:top + self.crop, left:left + self.crop]
        mean = frames.new_tensor(self.mean).view(1, 3, 1, 1)
        std = frames.new_tensor(self.std).view(1, 3, 1, 1)
        return (frames - mean) / std


def load_clip(path: str | Path | None, argument: str = "clip_path", with_text: bool = True):
    """CLIP model (+ tokenizer) and its image preprocessing from a local ``save_pretrained`` directory.

    Returns ``(model, tokenizer or None, ClipImagePreprocessing)``. Directories holding only a vision
    tower (``CLIPVisionModelWithProjection``) are accepted when ``with_text`` is False.
    """
    from transformers import AutoTokenizer, CLIPModel, CLIPVisionModelWithProjection

    directory = require_directory(path, argument, "CLIP model")
    model_type = read_json(directory / "config.json").get("model_type", "clip")
    if model_type == "clip_vision_model" and with_text:
        raise ValueError(
            f"'{directory}' (from `{argument}`) holds only a CLIP vision tower; a text tower is needed"
        )
    if model_type == "clip_vision_model":
        model = CLIPVisionModelWithProjection.from_pretrained(directory, local_files_only=True)
        image_size = model.config.image_size
    else:
        model = CLIPModel.from_pretrained(directory, local_files_only=True)
        image_size = model.config.vision_config.image_size
    tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True) if with_text else None
    return model.eval(), tokenizer, ClipImagePreprocessing.from_directory(directory, image_size)


def _pooled(output) -> Tensor:  # noqa: ANN001 - tensor (transformers 4) or model output (5)
    if isinstance(output, Tensor):
        return output
    return output.image_embeds if getattr(output, "image_embeds", None) is not None else output.pooler_output


def clip_image_embeddings(model: nn.Module, pixel_values: Tensor) -> Tensor:
    """Projected image embeddings [N, D] of a CLIPModel or CLIPVisionModelWithProjection (not normalised)."""
    if hasattr(model, "get_image_features"):
        return _pooled(model.get_image_features(pixel_values=pixel_values))
    return _pooled(model(pixel_values=pixel_values))


class CLIPSimilarity(Metric):
    """Mean over videos of the frame-averaged CLIP cosine between frames and caption; higher is better.

    ``update(videos, captions)`` takes videos [B, T, 3, H, W], RGB float in [-1, 1], and B captions.

    Args:
        clip_path: local directory with a ``CLIPModel`` and its tokenizer (``save_pretrained`` output of
            e.g. openai/clip-vit-base-patch16), optionally with ``preprocessor_config.json``.
        frames_per_chunk: frames encoded at once, to bound memory for long or many videos.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    score_sum: Tensor
    video_count: Tensor

    def __init__(self, clip_path: str | Path | None = None, frames_per_chunk: int = 256, **kwargs):
        super().__init__(**kwargs)
        model, tokenizer, preprocessing = load_clip(clip_path, argument="clip_path", with_text=True)
        self.clip = FrozenNetwork(model)
        self.tokenizer = tokenizer
        self.preprocessing = preprocessing
        self.frames_per_chunk = frames_per_chunk
        self.max_text_length = int(model.config.text_config.max_position_embeddings)
        self.add_state("score_sum", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("video_count", torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")

    @torch.no_grad()
    def video_scores(self, videos: Tensor, captions: Sequence[str]) -> Tensor:
        """Per-video frame-averaged cosine [B] (float64)."""
        if videos.ndim != 5 or videos.shape[2] != 3:
            raise ValueError(f"expected videos [B, T, 3, H, W], got {tuple(videos.shape)}")
        if isinstance(captions, str) or len(captions) != videos.shape[0]:
            raise ValueError(f"need one caption per video: {videos.shape[0]} videos")
        model, device = self.clip.network, self.clip.device
        batch, frames = videos.shape[:2]
        with torch.autocast(device_type=device.type, enabled=False):
            tokens = self.tokenizer(list(captions), padding=True, truncation=True,
                                    max_length=self.max_text_length, return_tensors="pt").to(device)
            text = _pooled(model.get_text_features(input_ids=tokens["input_ids"],
                                                   attention_mask=tokens["attention_mask"]))
            flat = videos.flatten(0, 1)  # [B*T, 3, H, W]
            image = torch.cat([
                clip_image_embeddings(model, self.preprocessing(chunk.to(device)))
                for chunk in flat.split(self.frames_per_chunk)
            ])
        text = F.normalize(text.double(), dim=-1)  # [B, D]
        image = F.normalize(image.double(), dim=-1).view(batch, frames, -1)  # [B, T, D]
        return (image * text[:, None]).sum(dim=-1).mean(dim=1)

    def update(self, videos: Tensor, captions: Sequence[str]) -> None:
        scores = self.video_scores(videos, captions).to(self.score_sum.device)
        self.score_sum = self.score_sum + scores.sum()
        self.video_count = self.video_count + scores.numel()

    def compute(self) -> Tensor:
        if int(self.video_count) == 0:
            raise ValueError("CLIPSimilarity needs at least one video")
        return self.score_sum / self.video_count
