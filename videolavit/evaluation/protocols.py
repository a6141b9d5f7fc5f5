"""Readers of local text-to-video benchmark layouts (paper A.4) into prompts with their real videos.

Each reader returns a deterministic list of :class:`EvalItem`: the prompt a model generates a video
for, the real video the protocol pairs with it (the real side of FVD / frame FID), an id, and a class
label where the benchmark has one. Nothing is downloaded; the datasets are read as their publishers
distribute them:

- ``msrvtt``: the MSR-VTT test split, 2,990 videos with one caption each (A.4).
- ``ucf101``: UCF-101, 101 class-name prompts × 20 generated videos = 2,020 prompts (A.4).
- ``csv``: a CSV of ``prompt`` (and optionally ``video``, ``id``, ``label``) for people's own sets.

Readers only check the layout they need to *build prompts* (annotation file, class folders). Whether
the real videos must exist depends on the metrics and on cached real statistics, so an absent video
is not an error here: ``real_video`` holds its expected path and the evaluation counts it as skipped.
"""

from __future__ import annotations

import csv
import json
import logging
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

PROTOCOLS = ("msrvtt", "ucf101", "csv")
MSRVTT_TEST_VIDEOS = 2990  # video7010 … video9999
MSRVTT_ANNOTATION_NAMES = ("test_videodatainfo.json", "MSRVTT_data.json")
UCF101_CLASSES = 101
UCF101_VIDEOS_PER_CLASS = 20
VIDEO_SUFFIXES = (".mp4", ".avi", ".webm", ".mkv", ".mov")


class ProtocolLayoutError(ValueError):
    """A benchmark directory does not have the layout a protocol reads; the message names what is missing."""


@dataclass(frozen=True)
class EvalItem:
    """One prompt to generate a video for.

    ``real_video``: the real video the protocol pairs with this prompt (may not exist on disk; then the
    evaluation counts it as skipped), or None when the protocol has none for it. ``label``: class index
    (UCF-101) or None.
    """

    prompt: str
    real_video: Path | None
    id: str
    label: int | None = None


def _check_limit(limit: int | None) -> None:
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be a positive number of items, got {limit}")


def _natural_key(text: str) -> tuple:
    """'video10' after 'video9': digit runs compare as numbers."""
    return tuple(int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text))


# -- MSR-VTT --------------------------------------------------------------------------------------------


def find_msrvtt_annotations(root: Path) -> Path:
    """The official annotation JSON under ``root`` (or one of its usual sub-folders)."""
    folders = [root, root / "annotation", root / "annotations", root / "MSRVTT" / "annotation",
               root / "msrvtt_data"]
    for folder in folders:
        for name in MSRVTT_ANNOTATION_NAMES:
            if (folder / name).is_file():
                return folder / name
    raise ProtocolLayoutError(
        f"MSR-VTT annotations not found: looked for {' or '.join(MSRVTT_ANNOTATION_NAMES)} in "
        f"{', '.join(str(f) for f in folders)}. Point --root at the MSR-VTT folder or pass --annotations FILE."
    )


def _video_in(folder: Path, video_id: str) -> Path | None:
    for suffix in VIDEO_SUFFIXES:
        if (folder / f"{video_id}{suffix}").is_file():
            return folder / f"{video_id}{suffix}"
    return None


def find_msrvtt_videos(root: Path, video_ids: list[str]) -> Path | None:
    """The folder under ``root`` holding most of the given ``<video_id>.mp4`` files (None: no such folder)."""
    folders = [root / "videos" / "all", root / "videos", root / "TestVideo", root / "test_videos",
               root / "MSRVTT" / "videos" / "all", root]
    probe = video_ids[:50]  # enough to tell the right folder from the wrong ones
    best, best_count = None, 0
    for folder in folders:
        if folder.is_dir():
            count = sum(_video_in(folder, video_id) is not None for video_id in probe)
            if count > best_count:
                best, best_count = folder, count
    return best


def _load_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ProtocolLayoutError(f"cannot read '{path}' as JSON: {error}") from None


def read_msrvtt(root: str | Path, seed: int = 0, limit: int | None = None, annotations: str | Path | None = None,
                videos_dir: str | Path | None = None, split: str = "test") -> list[EvalItem]:
    """MSR-VTT caption–video pairs of ``split``: one caption per video (2,990 for the test split, A.4).

    Layout: the official annotation JSON (``test_videodatainfo.json`` or ``MSRVTT_data.json``, with
    ``videos`` [{video_id, split}] and ``sentences`` [{video_id, caption}]) and a folder of
    ``<video_id>.mp4`` (``videos/all``, ``videos``, ``TestVideo`` … under ``root``, or ``videos_dir``).

    The caption of each video is drawn from its ~20 captions by a generator seeded with (``seed``,
    video id), so it does not depend on which other videos are read (``limit``, a partial download).
    Items are ordered by video number; ``limit`` keeps the first ones.
    """
    _check_limit(limit)
    root = Path(root).expanduser()
    if annotations is None and not root.is_dir():
        raise ProtocolLayoutError(f"MSR-VTT root '{root}' is not a directory (--root)")
    path = Path(annotations).expanduser() if annotations is not None else find_msrvtt_annotations(root)
    if not path.is_file():
        raise ProtocolLayoutError(f"MSR-VTT annotation file not found: '{path}' (--annotations)")
    data = _load_json(path)
    missing = [key for key in ("videos", "sentences") if not isinstance(data, dict) or key not in data]
    if missing:
        raise ProtocolLayoutError(
            f"'{path}' is not an MSR-VTT annotation file: it lacks {missing} (expected 'videos' with "
            f"video_id/split and 'sentences' with video_id/caption)")
    try:
        splits = {str(video["video_id"]): str(video.get("split", "")) for video in data["videos"]}
        captions: dict[str, list[tuple[int, str]]] = {}
        for order, sentence in enumerate(data["sentences"]):
            key = int(sentence.get("sen_id", order))
            captions.setdefault(str(sentence["video_id"]), []).append((key, str(sentence["caption"]).strip()))
    except (KeyError, TypeError, AttributeError) as error:
        raise ProtocolLayoutError(
            f"'{path}': an entry lacks {error} (videos need video_id and split, sentences video_id and caption)"
        ) from None
    video_ids = sorted((v for v, s in splits.items() if s == split), key=_natural_key)
    if not video_ids:
        present = sorted(set(splits.values()))
        raise ProtocolLayoutError(f"'{path}' has no videos of split '{split}' (splits present: {present})")
    uncaptioned = [v for v in video_ids if not captions.get(v)]
    if uncaptioned:
        log.warning("MSR-VTT: %d %s videos have no caption and are left out (e.g. %s)", len(uncaptioned), split,
                    uncaptioned[0])
        video_ids = [v for v in video_ids if captions.get(v)]
    if split == "test" and limit is None and len(video_ids) != MSRVTT_TEST_VIDEOS:
        log.warning("MSR-VTT: %d test videos in '%s'; the paper's protocol has %d", len(video_ids), path,
                    MSRVTT_TEST_VIDEOS)
    if limit is not None:
        video_ids = video_ids[:limit]

    folder = Path(videos_dir).expanduser() if videos_dir is not None else find_msrvtt_videos(root, video_ids)
    if folder is None:
        folder = root / "videos"
        log.warning("MSR-VTT: no folder of <video_id>.mp4 files found under '%s'; expecting them in '%s'",
                    root, folder)
    items = []
    for video_id in video_ids:
        options = [caption for _, caption in sorted(captions[video_id], key=lambda pair: pair[0])]
        chosen = options[random.Random(f"msrvtt:{seed}:{video_id}").randrange(len(options))]
        real = _video_in(folder, video_id) or folder / f"{video_id}.mp4"
        items.append(EvalItem(prompt=chosen, real_video=real, id=video_id))
    return items


# -- UCF-101 --------------------------------------------------------------------------------------------


def class_name_prompt(name: str) -> str:
    """A UCF-101 class name as words: 'ApplyEyeMakeup' → 'apply eye makeup', 'YoYo' → 'yo yo'."""
    words = re.findall(r"[A-Z]+(?![a-z])|[A-Z]?[a-z]+|\d+", name)
    return " ".join(word.lower() for word in words) or name


def load_prompt_overrides(path: str | Path) -> dict[str, str]:
    """Class → prompt from a JSON object, or a CSV with ``class`` and ``prompt`` columns."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ProtocolLayoutError(f"prompt file not found: '{path}' (--prompts-file)")
    if path.suffix.lower() == ".json":
        data = _load_json(path)
        if not isinstance(data, dict) or not all(isinstance(v, str) for v in data.values()):
            raise ProtocolLayoutError(f"'{path}' must hold a JSON object mapping class names to prompts")
        return {str(k): v.strip() for k, v in data.items()}
    with open(path, newline="") as handle:
        reader = csv.DictReader(handle)
        if not reader.fieldnames or not {"class", "prompt"} <= set(reader.fieldnames):
            raise ProtocolLayoutError(f"'{path}' needs a header with 'class' and 'prompt' columns "
                                      f"(got {reader.fieldnames})")
        return {row["class"].strip(): row["prompt"].strip() for row in reader}


def _ucf_dataset_dir(root: Path) -> Path:
    for name in ("UCF-101", "UCF101"):
        if (root / name).is_dir():
            return root / name
    return root


def _class_videos(folder: Path) -> list[Path]:
    """A class's clips ordered by group then clip (v_X_g01_c01, v_X_g01_c02, …, v_X_g25_c07).

    Matched by suffix, not by class name: one class's files are spelled differently from its folder
    (HandstandPushups holds v_HandStandPushups_*).
    """
    def key(path: Path) -> tuple:
        match = re.search(r"_g(\d+)_c(\d+)", path.stem)
        return (0, int(match.group(1)), int(match.group(2)), path.name) if match else (1, 0, 0, path.name)

    return sorted((p for p in folder.iterdir() if p.suffix.lower() in VIDEO_SUFFIXES and p.is_file()), key=key)


def _ucf_classes(root: Path, dataset: Path) -> list[tuple[int, str]]:
    """(label, class name): from ucfTrainTestlist/classInd.txt when present, else sorted folder names."""
    folders = sorted(p.name for p in dataset.iterdir() if p.is_dir() and _class_videos(p))
    for index_file in (root / "ucfTrainTestlist" / "classInd.txt", dataset.parent / "ucfTrainTestlist" /
                       "classInd.txt", root / "classInd.txt"):
        if index_file.is_file():
            classes = []
            for line in index_file.read_text().splitlines():
                parts = line.split()
                if len(parts) == 2 and parts[0].isdigit():
                    classes.append((int(parts[0]) - 1, parts[1]))
            if classes:
                extra = sorted(set(folders) - {name for _, name in classes})
                if extra:
                    log.warning("UCF-101: folders not in %s are ignored: %s", index_file, extra[:5])
                return classes
    if not folders:
        raise ProtocolLayoutError(
            f"no UCF-101 class folders under '{dataset}': expected {dataset}/<Class>/v_<Class>_gXX_cYY.avi "
            f"(e.g. UCF-101/ApplyEyeMakeup/v_ApplyEyeMakeup_g01_c01.avi) or ucfTrainTestlist/classInd.txt")
    return list(enumerate(folders))


def _spread(count: int, wanted: int) -> list[int]:
    """``wanted`` distinct indices spread evenly over ``count`` (all of them when count ≤ wanted)."""
    if count <= wanted:
        return list(range(count))
    return [(k * count) // wanted for k in range(wanted)]


def read_ucf101(root: str | Path, videos_per_class: int = UCF101_VIDEOS_PER_CLASS, limit: int | None = None,
                prompts_file: str | Path | None = None) -> list[EvalItem]:
    """UCF-101 as in A.4: each class name is a prompt, generated ``videos_per_class`` (20) times.

    Layout: ``root/UCF-101/<Class>/v_<Class>_gXX_cYY.avi`` (or the class folders directly in ``root``);
    class order and labels from ``ucfTrainTestlist/classInd.txt`` when present. Prompts come from the
    class name (CamelCase → lower-case words), or from ``prompts_file`` (class → prompt) where it has one.

    Real side: the k-th generated video of a class is paired with the class's clip number
    ⌊k·n / 20⌋ of its n clips in (group, clip) order — 20 real clips per class, spread over all of the
    class's 25 groups. Why not the first 20: clips of a group share actor and background, and the first
    20 would come from only ~4 of the 25 groups, understating the real distribution's spread. Why not
    all 13,320: the real side then has the generated side's class balance and costs 2,020 decodes (the
    statistics are cached once anyway; :func:`ucf101_real_videos` lists all clips for that variant).

    Items are interleaved over classes (class 0 #0, class 1 #0, …, class 0 #1, …) so that ``limit``
    keeps a class-balanced subset.
    """
    _check_limit(limit)
    if videos_per_class < 1:
        raise ValueError(f"videos_per_class must be positive, got {videos_per_class}")
    root = Path(root).expanduser()
    if not root.is_dir():
        raise ProtocolLayoutError(f"UCF-101 root '{root}' is not a directory (--root)")
    dataset = _ucf_dataset_dir(root)
    classes = _ucf_classes(root, dataset)
    if len(classes) != UCF101_CLASSES:
        log.warning("UCF-101: %d classes under '%s'; the paper's protocol has %d", len(classes), dataset,
                    UCF101_CLASSES)
    overrides = load_prompt_overrides(prompts_file) if prompts_file is not None else {}
    unknown = sorted(set(overrides) - {name for _, name in classes})
    if unknown:
        raise ProtocolLayoutError(f"prompt file names classes that are not in the data set: {unknown[:5]}")

    per_class: list[tuple[int, str, str, list[Path | None]]] = []
    for label, name in classes:
        clips = _class_videos(dataset / name) if (dataset / name).is_dir() else []
        chosen: list[Path | None] = [clips[i] for i in _spread(len(clips), videos_per_class)]
        chosen += [None] * (videos_per_class - len(chosen))
        per_class.append((label, name, overrides.get(name) or class_name_prompt(name), chosen))
    items = [EvalItem(prompt=prompt, real_video=real[k], id=f"{name}/{k:02d}", label=label)
             for k in range(videos_per_class) for label, name, prompt, real in per_class]
    return items[:limit] if limit is not None else items


def ucf101_real_videos(root: str | Path) -> list[Path]:
    """Every UCF-101 clip (13,320), class by class, for a real side of all videos instead of 20 per class."""
    root = Path(root).expanduser()
    dataset = _ucf_dataset_dir(root)
    return [clip for _, name in _ucf_classes(root, dataset) if (dataset / name).is_dir()
            for clip in _class_videos(dataset / name)]


# -- CSV ------------------------------------------------------------------------------------------------

CSV_PROMPT_COLUMNS = ("prompt", "caption", "text")
CSV_VIDEO_COLUMNS = ("video", "path", "video_path")


def read_csv_protocol(path: str | Path, limit: int | None = None) -> list[EvalItem]:
    """A CSV with a ``prompt`` column and optional ``video`` (real video, relative to the CSV's folder),
    ``id`` and ``label`` columns; ``path`` may also be a folder holding ``prompts.csv``. Rows keep
    their order; ids default to the row number."""
    _check_limit(limit)
    path = Path(path).expanduser()
    if path.is_dir():
        path = path / "prompts.csv"
    if not path.is_file():
        raise ProtocolLayoutError(f"prompt CSV not found: '{path}' (--root: a CSV file or a folder with prompts.csv)")
    with open(path, newline="") as handle:
        reader = csv.DictReader(handle)
        fields = reader.fieldnames or []
        prompt_column = next((c for c in CSV_PROMPT_COLUMNS if c in fields), None)
        if prompt_column is None:
            raise ProtocolLayoutError(f"'{path}' has no prompt column (one of {list(CSV_PROMPT_COLUMNS)}); "
                                      f"columns: {fields}")
        video_column = next((c for c in CSV_VIDEO_COLUMNS if c in fields), None)
        items = []
        for row_number, row in enumerate(reader):
            prompt = (row.get(prompt_column) or "").strip()
            if not prompt:
                raise ProtocolLayoutError(f"'{path}' row {row_number + 2}: empty {prompt_column}")
            video = (row.get(video_column) or "").strip() if video_column else ""
            real = (path.parent / video) if video else None
            label = (row.get("label") or "").strip()
            try:
                label_value = int(label) if label else None
            except ValueError:
                raise ProtocolLayoutError(f"'{path}' row {row_number + 2}: label '{label}' is not an integer") from None
            items.append(EvalItem(prompt=prompt, real_video=real, id=(row.get("id") or "").strip()
                                  or f"{row_number:06d}", label=label_value))
            if limit is not None and len(items) == limit:
                break
    if not items:
        raise ProtocolLayoutError(f"'{path}' has no rows")
    ids = [item.id for item in items]
    if len(set(ids)) != len(ids):
        raise ProtocolLayoutError(f"'{path}': ids are not unique")
    return items


def read_protocol(name: str, root: str | Path, limit: int | None = None, **options: Any) -> list[EvalItem]:
    """Dispatch to the reader of protocol ``name`` (one of :data:`PROTOCOLS`) with its options."""
    readers = {"msrvtt": read_msrvtt, "ucf101": read_ucf101, "csv": read_csv_protocol}
    if name not in readers:
        raise ValueError(f"unknown protocol '{name}'; choose one of {list(PROTOCOLS)}")
    return readers[name](root, limit=limit, **options)
