"""The video coder: decomposed clips and keyframes -> code ids and LLM id blocks, with the frozen stage-1 tokenizers.

One object owns "video -> LLM ids" for every user - the tokenize job (which writes token shards for the LLM
stages), ``chat`` (``videolavit.inference.video_chat``) and image-to-video (``text_to_video``) - so the ids the
LLM is trained on and the ids it sees at inference come from the same code. ``VideoCoder``'s docstring says how
each kind of code is made.

The tokenizers are loaded lazily, once per process, on ``device``; their code counts must be the vocabulary's.
``fingerprint`` identifies the exports (a hash of their files): token shards record it, so a stage never mixes
ids of two different tokenizers.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from videolavit.llm.vocabulary import Vocabulary
from videolavit.models.export_names import KEYFRAME_TOKENIZER, MOTION_TOKENIZER
from videolavit.video.clips import CLIP_FRAMES, clip_motion
from videolavit.video.crop import resize_crop_box, to_chw
from videolavit.video.frames import decode_keyframes
from videolavit.video.motion_grid import TOKENIZER_SCALE

EXPORT_SUFFIXES = (".json", ".safetensors")


class TokenizerExportError(FileNotFoundError):
    """A stage-1 tokenizer export (motion / keyframe) is missing, or does not fit the vocabulary."""


def export_files(directory: str | Path, name: str) -> list[Path]:
    """The files of export ``name`` in ``directory``; raises ``TokenizerExportError`` if one is missing."""
    files = [Path(directory) / f"{name}{suffix}" for suffix in EXPORT_SUFFIXES]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise TokenizerExportError(f"{directory} has no {name}.json/.safetensors (the stage-1 export; missing "
                                   f"{missing})")
    return files


def export_num_codes(directory: str | Path, name: str) -> int:
    """The codebook size an export records in its JSON config (without loading its weights)."""
    import json

    path = export_files(directory, name)[0]
    try:
        return int(json.loads(path.read_text())["config"]["num_codes"])
    except (ValueError, KeyError, TypeError) as exc:
        raise TokenizerExportError(f"{path} records no readable config.num_codes: {exc}") from None


def exports_fingerprint(motion_export: str | Path, keyframe_export: str | Path | None) -> str:
    """sha256 over the export files (names and bytes) of the motion and (if any) keyframe tokenizer.

    The keyframe export's JSON records its ViT backbone's own fingerprint, so a different backbone changes it too.
    """
    digest = hashlib.sha256()
    exports = [(MOTION_TOKENIZER, motion_export)] + ([(KEYFRAME_TOKENIZER, keyframe_export)] if keyframe_export else [])
    for name, directory in exports:
        for path in export_files(directory, name):
            digest.update(path.name.encode())
            with open(path, "rb") as handle:
                for block in iter(lambda: handle.read(1 << 20), b""):
                    digest.update(block)
    return digest.hexdigest()


def motion_clip_inputs(motion: np.ndarray, starts: Sequence[int], grid: tuple[int, int],
                       clip_frames: int = CLIP_FRAMES) -> torch.Tensor:
    """float32 [N, 2, T, h, w]: the motion fields of the clips at ``starts`` at the tokenizer's grid and scale.
    A plain function (no model) so decoding processes can prepare batches for a tokenizer running elsewhere."""
    return torch.stack([clip_motion(motion, s, tuple(grid), clip_frames, TOKENIZER_SCALE) for s in starts])


def keyframe_inputs(mp4: bytes, meta: dict, starts: Sequence[int], size: int) -> torch.Tensor:
    """float [N, 3, size, size] in [0, 1]: the clips' keyframes resized (aspect kept) and centre-cropped."""
    (rh, rw), (ys, xs) = resize_crop_box(meta["height"], meta["width"], (size, size))
    frames = decode_keyframes(mp4, list(starts), meta["fps"], size=(rh, rw))[:, ys, xs]
    return to_chw(frames).float().div(255.0)


def video_block_ids(keyframes: Sequence[np.ndarray] | None, motions: Sequence[np.ndarray] | np.ndarray,
                    vocabulary: Vocabulary) -> list[int]:
    """LLM ids of a video from its per-clip code arrays: ``[IMG] kf [/IMG] [MOV] motion [/MOV]`` per clip
    (``keyframes=None``: ``[MOV] motion [/MOV]`` only). Codes must already lie in their ranges (callers check);
    built with NumPy because the pre-training loader runs this for every video it reads."""
    v = vocabulary
    pieces: list[np.ndarray] = []
    mov_open, mov_close = np.array([v.motion_start_id]), np.array([v.motion_end_id])
    img_open, img_close = np.array([v.image_start_id]), np.array([v.image_end_id])
    for clip, motion in enumerate(motions):
        if keyframes is not None:
            pieces += [img_open, np.asarray(keyframes[clip], dtype=np.int64) + v.visual_offset, img_close]
        pieces += [mov_open, np.asarray(motion, dtype=np.int64) + v.motion_offset, mov_close]
    if not pieces:
        raise ValueError("a video needs at least one clip")
    return np.concatenate(pieces).tolist()


class VideoCoder:
    """The frozen stage-1 tokenizers of one set of exports, turning clips and images into codes and LLM ids.

    * motion codes: each clip's motion field (``clip_motion`` at the motion tokenizer's grid, x10 tokenizer scale)
      through the stage-1a export (``load_export(dir, "motion_tokenizer")``); a fixed number of codes per clip;
    * keyframe codes: each clip's keyframe (decoded from the stored mp4, resized keeping the aspect and centre-cropped
      to the ViT's input, ``resize_crop_box``) through the LaVIT keyframe tokenizer export (``keyframe_tokenizer``,
      rebuilt by ``load_keyframe_tokenizer``); a variable number of codes per keyframe;
    * LLM ids (``video_ids``): per clip ``[IMG] keyframe codes [/IMG] [MOV] motion codes [/MOV]``, or, for a coder
      without a keyframe tokenizer (a motion-only LLM), ``[MOV] motion codes [/MOV]`` only.

    Args:
        vocabulary: the id layout the codes are placed in (its ``motion_codes`` / ``visual_codes`` must equal the
            tokenizers' codebook sizes).
        motion_export: directory with ``motion_tokenizer.{json,safetensors}`` (stage-1a export); None for a coder
            of images only (the LLM views' image sources).
        keyframe_export: directory with ``keyframe_tokenizer.{json,safetensors}``; None: no keyframe codes (a
            motion-only LLM; ``video_codes`` then returns None keyframes).
        keyframe_backbone_weights: local ViT weight file, overriding the path recorded in the keyframe export.
        device: where the tokenizers run.
        clip_frames: frames per clip (the motion tokenizer's ``num_frames`` must match).
    """

    def __init__(self, vocabulary: Vocabulary, motion_export: str | Path | None,
                 keyframe_export: str | Path | None = None,
                 keyframe_backbone_weights: str | None = None, device: str | torch.device = "cpu",
                 clip_frames: int = CLIP_FRAMES):
        self.vocabulary = vocabulary
        self.motion_export = str(motion_export) if motion_export is not None else None
        self.keyframe_export = str(keyframe_export) if keyframe_export is not None else None
        self.keyframe_backbone_weights = keyframe_backbone_weights
        self.device = torch.device(device)
        self.clip_frames = int(clip_frames)
        if self.motion_export is not None:
            export_files(self.motion_export, MOTION_TOKENIZER)
        if self.keyframe_export is not None:
            export_files(self.keyframe_export, KEYFRAME_TOKENIZER)
        self._motion: torch.nn.Module | None = None
        self._keyframe: dict[str, torch.nn.Module] = {}
        self._fingerprint: str | None = None

    @property
    def has_keyframes(self) -> bool:
        return self.keyframe_export is not None

    def fingerprint(self) -> str:
        """``exports_fingerprint`` of this coder's exports (computed once)."""
        if self.motion_export is None:
            raise TokenizerExportError("a coder of images only has no token shard fingerprint")
        if self._fingerprint is None:
            self._fingerprint = exports_fingerprint(self.motion_export, self.keyframe_export)
        return self._fingerprint

    # ---- the frozen tokenizers, loaded once per process ------------------------------------------
    @property
    def motion_tokenizer(self) -> torch.nn.Module:
        if self._motion is None:
            from videolavit.models.export import load_export

            if self.motion_export is None:
                raise TokenizerExportError("this video coder has no motion tokenizer export (images only)")
            model = load_export(self.motion_export, MOTION_TOKENIZER, map_location=self.device)
            config = model.config
            if config.num_codes != self.vocabulary.motion_codes:
                raise TokenizerExportError(f"the motion tokenizer in {self.motion_export} has {config.num_codes} "
                                           f"codes but the vocabulary has motion_codes={self.vocabulary.motion_codes}")
            if config.num_frames != self.clip_frames:
                raise TokenizerExportError(f"the motion tokenizer in {self.motion_export} reads {config.num_frames}"
                                           f"-frame clips, the coder cuts {self.clip_frames}")
            self._motion = model.eval().requires_grad_(False)
        return self._motion

    def keyframe_tokenizer(self, export: str | Path | None = None) -> torch.nn.Module:
        """The frozen keyframe tokenizer of ``export`` (default: ``keyframe_export``)."""
        export = str(export) if export is not None else self.keyframe_export
        if export is None:
            raise TokenizerExportError("this video coder has no keyframe tokenizer export")
        if export not in self._keyframe:
            from videolavit.models.keyframe_tokenizer_export import load_keyframe_tokenizer

            export_files(export, KEYFRAME_TOKENIZER)
            model = load_keyframe_tokenizer(export, self.keyframe_backbone_weights, name=KEYFRAME_TOKENIZER,
                                            map_location=self.device)
            if model.config.num_codes != self.vocabulary.visual_codes:
                raise TokenizerExportError(f"the keyframe tokenizer in {export} has {model.config.num_codes} codes "
                                           f"but the vocabulary has visual_codes={self.vocabulary.visual_codes}")
            self._keyframe[export] = model.eval().requires_grad_(False)
        return self._keyframe[export]

    def keyframe_image_size(self, export: str | Path | None = None) -> int:
        """Side of the square images the keyframe tokenizer reads (its ViT's input size)."""
        return self.keyframe_tokenizer(export).config.vit.image_size

    @property
    def motion_tokens_per_clip(self) -> int:
        return int(self.motion_tokenizer.num_tokens)

    # ---- inputs ----------------------------------------------------------------------------------
    @property
    def motion_grid(self) -> tuple[int, int]:
        config = self.motion_tokenizer.config
        return int(config.height), int(config.width)

    def motion_clips(self, motion: np.ndarray, starts: Sequence[int]) -> torch.Tensor:
        """float32 [N, 2, T, h, w]: the clips' motion fields at the tokenizer's grid and scale."""
        return motion_clip_inputs(motion, starts, self.motion_grid, self.clip_frames)

    def keyframe_images(self, mp4: bytes, meta: dict, starts: Sequence[int]) -> torch.Tensor:
        """float [N, 3, S, S] in [0, 1]: the clips' keyframes, resized and centre-cropped to the ViT's input."""
        return keyframe_inputs(mp4, meta, starts, self.keyframe_image_size())

    # ---- codes -----------------------------------------------------------------------------------
    @torch.inference_mode()
    def motion_codes(self, clips: torch.Tensor) -> np.ndarray:
        """int64 [N, tokens]: motion code ids of motion fields [N, 2, T, h, w] (one batch)."""
        return self.motion_tokenizer.encode(clips.to(self.device)).cpu().numpy()

    @torch.inference_mode()
    def image_codes(self, images: torch.Tensor, export: str | Path | None = None) -> list[np.ndarray]:
        """Keyframe code ids (variable length, int64) of float images [N, 3, S, S] in [0, 1] at the ViT's size."""
        ids, lengths = self.keyframe_tokenizer(export).tokenize(images.to(self.device))
        ids, lengths = ids.cpu().numpy(), lengths.cpu().tolist()
        return [row[:n].copy() for row, n in zip(ids, lengths)]

    def video_codes(self, sample: dict, starts: Sequence[int]) -> tuple[list[np.ndarray] | None, np.ndarray]:
        """(keyframe codes per clip, or None without a keyframe tokenizer; motion codes [N, tokens]) of the clips
        of a decomposed video ``sample`` (``{"meta", "mp4", "motion"}``, the shard sample contract) at ``starts``."""
        motions = self.motion_codes(self.motion_clips(sample["motion"], starts))
        if not self.has_keyframes:
            return None, motions
        return self.image_codes(self.keyframe_images(sample["mp4"], sample["meta"], starts)), motions

    def video_ids(self, keyframes: Sequence[Sequence[int]] | None, motions: Sequence[Sequence[int]]) -> list[int]:
        """LLM ids of a video (``video_block_ids`` after checking every code's range)."""
        v = self.vocabulary
        for clip, motion in enumerate(motions):
            v.motion_id(np.asarray(motion).tolist())  # raises VocabularyError outside [0, motion_codes)
            if keyframes is not None:
                if len(keyframes[clip]) == 0:
                    raise ValueError(f"clip {clip} has no keyframe code")
                v.visual_id(np.asarray(keyframes[clip]).tolist())
        return video_block_ids(keyframes, motions, v)


__all__ = ["VideoCoder", "TokenizerExportError", "exports_fingerprint", "export_files", "video_block_ids",
           "motion_clip_inputs", "keyframe_inputs", "export_num_codes"]
