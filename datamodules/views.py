"""Views: what each stage takes from a shard sample (docs/design.md §3).

The one DataModule reads the same shards for every stage; a view turns each decoded sample into
zero or more training examples and collates them. Built-in views:

``motion``    clip motion fields only; the stored video is never decoded (tokenizer, stage 1a)
``video``     keyframe + clip frames + motion field (video detokenizer, stage 1b)
``keyframe``  clip keyframes as images (keyframe tokenizer / detokenizer)

LLM stages plug in their own ``SampleView`` subclasses (token/sequence views with packing) by
overriding ``__call__``, which sees the whole sample stream. Example keys are documented per view.
"""

from __future__ import annotations

import random
from typing import Iterable, Iterator

import numpy as np
from torch.utils.data import default_collate

from datamodules.sample_format import decode_sample
from datamodules.skip_tracker import SKIPS, SKIPS_KEY
from videolavit.video import errors
from videolavit.video.clips import CLIP_FRAMES, RELEASE_GRID, clip_motion, select_clip_starts
from videolavit.video.frames import decode_clip, decode_keyframes
from videolavit.video.crop import resize_crop_box as _resize_crop_box
from videolavit.video.crop import to_chw as _to_chw
from videolavit.video.motion_grid import TOKENIZER_SCALE

VIEWS: dict[str, type["SampleView"]] = {}


def register_view(name: str):
    def decorator(cls):
        VIEWS[name] = cls
        cls.name = name
        return cls
    return decorator


def build_view(view: "str | SampleView") -> "SampleView":
    if isinstance(view, SampleView):
        return view
    if view not in VIEWS:
        raise ValueError(f"unknown view {view!r}; built-in views: {sorted(VIEWS)} "
                         "(or pass a SampleView via class_path/init_args)")
    return VIEWS[view]()


class SampleView:
    """Base: decode each raw sample, map it to examples, count what must be skipped."""

    name = "custom"
    need_video = True  # whether examples need the stored mp4

    def __init__(self, clip_frames: int = CLIP_FRAMES, max_clips: int = 8, clips_per_video: str = "all"):
        if clips_per_video not in ("all", "random"):
            raise ValueError("clips_per_video must be 'all' or 'random'")
        self.clip_frames, self.max_clips, self.clips_per_video = clip_frames, max_clips, clips_per_video

    def clip_starts(self, sample: dict, train: bool, rng: random.Random) -> list[int]:
        meta = sample["meta"]
        starts = select_clip_starts(meta["iframes"], meta["num_frames"], self.clip_frames, self.max_clips)
        if not starts:
            raise errors.VideoSkip(errors.TOO_SHORT, f"{sample['key']}: no {self.clip_frames}-frame clip")
        if train and self.clips_per_video == "random":
            return [rng.choice(starts)]
        return starts

    def examples(self, sample: dict, train: bool, rng: random.Random) -> Iterator[dict]:
        raise TypeError(f"{type(self).__name__} must implement examples() or override __call__()")

    def __call__(self, samples: Iterable[dict], train: bool = False, rng: random.Random | None = None
                 ) -> Iterator[dict]:
        rng = rng or random.Random(0)
        for raw in samples:
            key = raw.get("__key__", "?")
            try:
                sample = decode_sample(raw, need_video=self.need_video)
                produced = list(self.examples(sample, train, rng))
            except errors.VideoSkip as skip:
                SKIPS.record(key, skip.reason, skip.detail)
                continue
            SKIPS.delivered()
            yield from produced

    def collate(self, examples: list[dict]) -> dict:
        batch = default_collate(examples)
        SKIPS.delivered()
        batch[SKIPS_KEY] = SKIPS.snapshot()
        return batch


@register_view("motion")
class MotionView(SampleView):
    """Examples: ``motion`` float32 [2, T, h, w] (×``scale`` standardised field), ``key``, ``clip_start``."""

    need_video = False

    def __init__(self, grid: tuple[int, int] = RELEASE_GRID, scale: float = TOKENIZER_SCALE, **kwargs):
        super().__init__(**kwargs)
        self.grid, self.scale = tuple(grid), scale

    def examples(self, sample, train, rng):
        for start in self.clip_starts(sample, train, rng):
            yield {"motion": clip_motion(sample["motion"], start, self.grid, self.clip_frames, self.scale),
                   "key": sample["key"], "clip_start": start}


def _crop_grid(motion: np.ndarray, height: int, width: int, target: tuple[int, int]) -> np.ndarray:
    """Crop a macroblock grid [T, 2, rows, cols] to the same centre region as the frames."""
    (rh, rw), (ys, xs) = _resize_crop_box(height, width, target)
    rows, cols = motion.shape[-2:]
    r0, r1 = int(np.floor(ys.start / rh * rows)), int(np.ceil(ys.stop / rh * rows))
    c0, c1 = int(np.floor(xs.start / rw * cols)), int(np.ceil(xs.stop / rw * cols))
    return motion[..., r0:max(r1, r0 + 1), c0:max(c1, c0 + 1)]


@register_view("video")
class VideoView(SampleView):
    """Examples: ``frames`` uint8 [T, 3, H, W], ``keyframe`` uint8 [3, H, W] (= frames[0]),
    ``motion`` float32 [2, T, h, w] (×``scale``), ``caption`` str, ``key``, ``clip_start``.

    Frames are resized (aspect kept) and centre-cropped to ``frame_size``; the motion grid is cropped
    to the same region before it is resized to ``grid``.
    """

    def __init__(self, frame_size: tuple[int, int] = (384, 384), grid: tuple[int, int] = (16, 16),
                 scale: float = 1.0, clips_per_video: str = "random", **kwargs):
        super().__init__(clips_per_video=clips_per_video, **kwargs)
        self.frame_size, self.grid, self.scale = tuple(frame_size), tuple(grid), scale

    def examples(self, sample, train, rng):
        meta = sample["meta"]
        (rh, rw), (ys, xs) = _resize_crop_box(meta["height"], meta["width"], self.frame_size)
        grid = _crop_grid(sample["motion"], meta["height"], meta["width"], self.frame_size)
        for start in self.clip_starts(sample, train, rng):
            frames = decode_clip(sample["mp4"], start, self.clip_frames, meta["fps"], size=(rh, rw))[:, ys, xs]
            frames = _to_chw(frames)
            yield {"frames": frames, "keyframe": frames[0].clone(),
                   "motion": clip_motion(grid, start, self.grid, self.clip_frames, self.scale),
                   "caption": sample["caption"], "key": sample["key"], "clip_start": start}


@register_view("keyframe")
class KeyframeView(SampleView):
    """Examples: ``image`` uint8 [3, S, S] (a clip keyframe, centre-cropped), ``caption``, ``key``."""

    def __init__(self, image_size: int = 224, **kwargs):
        super().__init__(**kwargs)
        self.image_size = image_size

    def examples(self, sample, train, rng):
        meta = sample["meta"]
        target = (self.image_size, self.image_size)
        (rh, rw), (ys, xs) = _resize_crop_box(meta["height"], meta["width"], target)
        starts = self.clip_starts(sample, train, rng)
        images = decode_keyframes(sample["mp4"], starts, meta["fps"], size=(rh, rw))[:, ys, xs]
        for start, image in zip(starts, _to_chw(images)):
            yield {"image": image, "caption": sample["caption"], "key": sample["key"], "clip_start": start}
