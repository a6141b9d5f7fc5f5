"""Still images of a moving-shapes corpus: its image-text pairs and image conversations.

Video-LaVIT pre-trains on image-text pairs next to video-text pairs (docs/design.md §8) and instruction-tunes
on LLaVA image conversations next to video ones.
The moving-shapes corpus gets the same two image sources from its own videos: evenly spaced frames of every
video, rendered without the H.264 round trip, each captioned by what a still shows (colour, shape and
background; not the direction) and asked about its shape and colour.

Why the tiny chain needs them: in a video's LLM tokens only a few keyframe codes show the object, so a small
corpus of videos gives the tiny LLM too few examples of "these codes mean red" and it memorises the training
videos instead; a still is a handful of codes plus a caption, so a packed row holds many of them (figures in
docs/measurements.md). :func:`write_stills` adds them to the corpus directory (layout in its docstring);
everything is a pure function of the corpus' specs and ``stills_per_video``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from videolavit.atomic_files import atomic_file, write_text_atomic
from videolavit.synth.shape_plan import VideoSpec
from videolavit.synth.shape_render import render_background, render_frame

IMAGE_DIR = "images"
IMAGE_TEXT_FILE = "image_text.jsonl"
IMAGE_QA_FILE = "image_qa.json"
STILL_FILES = (IMAGE_TEXT_FILE, IMAGE_QA_FILE)

STILL_CAPTION_TEMPLATES: tuple[str, ...] = (
    "a {color} {shape} over a {background}-tinted background",
    "a picture of a {color} {shape} on a plain {background} background",
    "a single {color} {shape} on a {background} backdrop",
)

IMAGE_QUESTIONS: dict[str, tuple[str, ...]] = {  # what a still can answer: no direction
    "shape": ("What shape is in the image?", "Which shape appears in this picture?", "What kind of shape is shown?"),
    "color": ("What color is the shape?", "What is the color of the shape?", "Which color does the shape have?"),
}


def still_frames(spec: VideoSpec, per_video: int) -> list[int]:
    """``per_video`` evenly spaced frame indices of the video, first and last included (distinct, sorted)."""
    if per_video < 1:
        raise ValueError(f"stills per video must be >= 1, got {per_video}")
    return sorted(set(np.linspace(0, spec.num_frames - 1, per_video).round().astype(int).tolist()))


def still_caption(spec: VideoSpec, frame_index: int) -> str:
    rng = np.random.default_rng([spec.seed, spec.index, 2, frame_index])
    template = STILL_CAPTION_TEMPLATES[int(rng.integers(len(STILL_CAPTION_TEMPLATES)))]
    return template.format(color=spec.color, shape=spec.shape, background=spec.background)


def still_conversations(spec: VideoSpec, frame_index: int, image: str) -> list[dict]:
    """One single-turn LLaVA conversation per attribute a still shows (shape, colour)."""
    rng = np.random.default_rng([spec.seed, spec.index, 3, frame_index])
    answers = {"shape": spec.shape, "color": spec.color}
    return [
        {"id": f"{Path(image).stem}#{attribute}", "image": image, "attribute": attribute,
         "conversations": [{"from": "human", "value": "<image>\n" + phrasings[int(rng.integers(len(phrasings)))]},
                           {"from": "gpt", "value": answers[attribute]}]}
        for attribute, phrasings in IMAGE_QUESTIONS.items()
    ]  # fmt: skip


def _write_png(path: Path, pixels: np.ndarray) -> None:
    from PIL import Image

    with atomic_file(path) as tmp:
        Image.fromarray(pixels, mode="RGB").save(tmp, format="PNG")


def write_stills(out_dir: str | os.PathLike, specs: Sequence[VideoSpec], per_video: int) -> int:
    """Render ``per_video`` stills of every video into ``out_dir``; return how many stills there are. Stills
    already on disk are kept (the renderer is deterministic). The layout::

        images/{id}_{frame:03d}.png   RGB frames of the videos (``stills_per_video`` per video)
        image_text.jsonl              one {"image", "caption"} per still (``PretrainSequenceView.image_text``)
        image_qa.json                 LLaVA conversations, one shape and one colour question per still
                                      (``InstructionSequenceView.image_conversations``, image_root = the corpus)
    """
    out_dir = Path(out_dir)
    image_dir = out_dir / IMAGE_DIR
    image_dir.mkdir(parents=True, exist_ok=True)
    pairs, conversations = [], []
    for spec in specs:
        background = None
        for frame_index in still_frames(spec, per_video):
            name = f"{IMAGE_DIR}/{spec.videoid}_{frame_index:03d}.png"
            if not (out_dir / name).is_file():
                if background is None:
                    background = render_background(spec)
                _write_png(out_dir / name, render_frame(spec, frame_index, background))
            pairs.append({"image": name, "caption": still_caption(spec, frame_index)})
            conversations.extend(still_conversations(spec, frame_index, name))
    write_text_atomic(out_dir / IMAGE_TEXT_FILE, "".join(json.dumps(p) + "\n" for p in pairs))
    write_text_atomic(out_dir / IMAGE_QA_FILE, json.dumps(conversations, indent=1) + "\n")
    return len(pairs)
