"""``python -m videolavit chat``: answer questions about videos with a trained LLM export.

One question::

    python -m videolavit chat --model runs/tiny/exports/instruct --tokenizers runs/tiny/exports \\
        --video clip.mp4 --question "In which direction does the shape move?"

prints the answer. Batch mode::

    python -m videolavit chat --model DIR --tokenizers DIR --qa-file qa.json --videos VIDEO_DIR \\
        --out predictions.jsonl

answers every question of a QA file (formats: ``read_eval_questions``) into Video-ChatGPT-style predictions
(``answer_qa_file``); unusable videos are counted skips, never the end of the run, and exact-match accuracy is
printed where it means something (docs/design.md §9).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path

from videolavit.commands.user_errors import (
    UsageError,
    check_input_dir,
    check_input_file,
    check_output_file,
    check_range,
    fail,
    read_text_file,
)

HELP = "answer questions about videos with a trained LLM (one question, or a QA file in batch)"

VIDEO_SUFFIXES = (".mp4", ".mkv", ".webm", ".avi", ".mov", ".m4v", ".mpg", ".mpeg")
VIDEO_NOT_FOUND = "video_not_found"
MAX_NEW_TOKENS = 4096  # an answer longer than a Llama-2 context is a typo, not a request
MAX_CLIPS = 64  # clips per video: 64 clips of 4 s are minutes of video, far beyond the contexts trained on

AnswerFunction = Callable[[Path, Sequence[str]], list[str]]  # (video file, questions) -> answers


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="LLM export directory (pretrain or instruct export_dir)")
    parser.add_argument("--tokenizers", default=None,
                        help="directory with the stage-1 exports motion_tokenizer.* and keyframe_tokenizer.* "
                             "(default: --model, which holds them for an imported release SFT model)")
    one = parser.add_argument_group("one question")
    one.add_argument("--video", help="a video file")
    one.add_argument("--question", help="the question about it")
    batch = parser.add_argument_group("batch mode")
    batch.add_argument("--qa-file", help="questions: synthetic qa.json or Video-ChatGPT evaluation JSON")
    batch.add_argument("--videos", help="directory of the videos named in the QA file")
    batch.add_argument("--out", help="predictions JSONL to write")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--min-new-tokens", type=int, default=None,
                        help="no eos before this many answer tokens (default: 8 for an imported release LLM, as the "
                             "release's understanding runner, else 0)")
    parser.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--keyframe-source", choices=["tokenizer", "none"], default="tokenizer",
                        help="'none' for an LLM trained without keyframe codes")
    parser.add_argument("--keyframe-backbone-weights", help="local ViT weights overriding the keyframe export's")
    parser.add_argument("--template", choices=["v1", "video_lavit_release"], default="v1")
    parser.add_argument("--max-clips", type=int, default=8, help="clips per video (as prepare --max-clips)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)


# ------------------------------------------------------------------------------------------- QA files
def read_eval_questions(path: str | Path) -> list[dict]:
    """Questions as ``{"id", "video_name", "question", "answer", "attribute"}`` from a supported QA file: our
    synthetic ``qa.json`` (``video_id/question/answer/attribute``) or Video-ChatGPT evaluation JSON
    (``video_name`` or ``video_id``, ``Q``/``question``/``q``, ``A``/``answer``/``a``, optional
    ``question_id``/``id``)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"QA file {path} does not exist")
    try:
        items = json.loads(read_text_file("--qa-file", path))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not JSON: {exc}") from None
    if not isinstance(items, list):
        raise ValueError(f"{path}: expected a JSON list of questions")

    def first(item, *keys: str):
        if not isinstance(item, dict):
            raise ValueError(f"{path}: every question must be a JSON object, got {type(item).__name__}")
        return next((item[k] for k in keys if k in item), None)

    questions = []
    for index, item in enumerate(items):
        video = first(item, "video_name", "video_id", "video")
        question = first(item, "question", "Q", "q")
        answer = first(item, "answer", "A", "a")
        if video is None or question is None:
            raise ValueError(f"{path}: item {index} needs a video (video_name/video_id) and a question (question/Q)")
        questions.append({"id": str(first(item, "question_id", "id") or f"{video}#{index}"),
                          "video_name": str(video), "question": str(question),
                          "answer": None if answer is None else str(answer), "attribute": item.get("attribute")})
    return questions


def find_video(directory: Path, name: str) -> Path | None:
    """``directory/name`` if it is a file, else ``directory/name<suffix>`` for the usual video suffixes."""
    direct = directory / name
    if direct.is_file():
        return direct
    for suffix in VIDEO_SUFFIXES:
        candidate = directory / f"{name}{suffix}"
        if candidate.is_file():
            return candidate
    return None


def answer_qa_file(questions: list[dict], videos: str | Path, out: str | Path, answer: AnswerFunction) -> dict:
    """Answer every question (grouped by video), write the predictions JSONL and return a summary:
    ``{"answered", "skipped": {reason: videos}, "accuracy": QAScore summary or None}``.

    Each video is decomposed and tokenised once. One JSON line per answered question, in the Video-ChatGPT
    evaluation format ``{"id", "video_name", "question", "answer", "pred"}`` (plus ``attribute`` when the file
    has one). A video that cannot be used (not found, unreadable, too short, ...) is skipped with its reason and
    counted; its questions get no line. The accuracy (exact match after ``normalize_answer``, overall and per
    attribute, over the answered questions) is computed only when every reference answer is one word."""
    from videolavit.evaluation.qa_score import QAScore, is_one_word
    from videolavit.inference.video_chat import VideoInputError

    videos, out = Path(videos), Path(out)
    if not videos.is_dir():
        raise FileNotFoundError(f"video directory {videos} does not exist")
    by_video: dict[str, list[dict]] = {}
    for q in questions:
        by_video.setdefault(q["video_name"], []).append(q)
    out.parent.mkdir(parents=True, exist_ok=True)
    skipped: Counter[str] = Counter()
    lines = []
    with open(out, "w", encoding="utf-8") as handle:
        for name, group in by_video.items():
            path = find_video(videos, name)
            try:
                if path is None:
                    raise VideoInputError(VIDEO_NOT_FOUND, f"no {name}[{'|'.join(VIDEO_SUFFIXES)}] in {videos}")
                preds = answer(path, [q["question"] for q in group])
            except VideoInputError as exc:
                skipped[exc.reason] += 1
                print(f"skipped video {name}: {exc}", file=sys.stderr)
                continue
            for q, pred in zip(group, preds):
                line = {"id": q["id"], "video_name": name, "question": q["question"], "answer": q["answer"],
                        "pred": pred}
                if q.get("attribute") is not None:
                    line["attribute"] = q["attribute"]
                handle.write(json.dumps(line, ensure_ascii=False) + "\n")
                lines.append(line)
    summary: dict = {"answered": len(lines), "questions": len(questions), "skipped": dict(skipped),
                     "accuracy": None}
    if lines and all(line["answer"] is not None and is_one_word(line["answer"]) for line in lines):
        score = QAScore()
        for line in lines:
            score.update(line["pred"], line["answer"], line.get("attribute"))
        summary["accuracy"] = score.summary()
    return summary


def accuracy_path(out: str | Path) -> Path:
    """Where the summary goes when there is an accuracy: ``predictions.jsonl`` -> ``predictions.accuracy.json``."""
    out = Path(out)
    return out.with_name(f"{out.stem}.accuracy.json")


def format_summary(summary: dict) -> str:
    text = f"answered {summary['answered']}/{summary['questions']} questions"
    if summary["skipped"]:
        text += "; skipped videos: " + ", ".join(f"{k}={v}" for k, v in sorted(summary["skipped"].items()))
    accuracy = summary.get("accuracy")
    if accuracy:
        text += f"\naccuracy {accuracy['accuracy']:.3f} ({accuracy['correct']}/{accuracy['total']})"
        for name, part in accuracy["per_attribute"].items():
            text += f"\n  {name:<12} {part['accuracy']:.3f} ({part['correct']}/{part['total']})"
    return text


# ------------------------------------------------------------------------------------------- command
def check_arguments(args: argparse.Namespace) -> str:
    """``"single"`` or ``"batch"``; raises :class:`UsageError` for a value that cannot work (before any loading)."""
    single = args.video is not None or args.question is not None
    batch = any(x is not None for x in (args.qa_file, args.videos, args.out))
    if single == batch or (single and (args.video is None or args.question is None)) or \
            (batch and None in (args.qa_file, args.videos, args.out)):
        raise UsageError("give either --video and --question, or --qa-file, --videos and --out")
    check_range("--max-new-tokens", args.max_new_tokens, 1, MAX_NEW_TOKENS)
    check_range("--max-clips", args.max_clips, 1, MAX_CLIPS)
    if args.min_new_tokens is not None:
        check_range("--min-new-tokens", args.min_new_tokens, 0, args.max_new_tokens)
    check_range("--temperature", args.temperature, 0, low_inclusive=False)
    check_range("--top-p", args.top_p, 0, 1, low_inclusive=False)
    if single:
        check_input_file("--video", args.video, "video file")
        return "single"
    check_input_dir("--videos", args.videos, "directory of the videos the QA file names")
    check_output_file("--out", args.out)
    check_output_file("--out (its accuracy file)", accuracy_path(args.out))
    return "batch"


def run(args: argparse.Namespace) -> int:
    from videolavit.inference.video_chat import ModelDirectoryError, TokenizerExportError, VideoChat, VideoInputError
    from videolavit.models.export import ExportError

    # Wrong or hostile exports (ExportError), a model directory that is not one, a tokenizer export that does
    # not fit the LLM (ValueError): the user points at other files. A ValueError here is such a mismatch.
    load_errors = (UsageError, ModelDirectoryError, TokenizerExportError, ExportError, FileNotFoundError, ValueError)
    try:
        mode = check_arguments(args)
        questions = read_eval_questions(args.qa_file) if mode == "batch" else None
        chat = VideoChat(args.model, args.tokenizers if args.tokenizers is not None else args.model,
                         keyframe_source=args.keyframe_source,
                         keyframe_backbone_weights=args.keyframe_backbone_weights, template=args.template,
                         max_clips=args.max_clips, device=args.device, seed=args.seed,
                         min_new_tokens=args.min_new_tokens)
    except load_errors as exc:
        return fail(exc)
    options = dict(max_new_tokens=args.max_new_tokens, do_sample=args.sample, temperature=args.temperature,
                   top_p=args.top_p)
    if mode == "single":
        try:
            print(chat.answer(args.video, args.question, **options))
        except VideoInputError as exc:
            return fail(f"{args.video}: {exc}")
        except load_errors as exc:  # the tokenizer exports load with the first video
            return fail(exc)
        return 0
    try:
        summary = answer_qa_file(questions, args.videos, args.out,
                                 lambda path, qs: chat.answer_many(path, qs, **options))
    except load_errors as exc:
        return fail(exc)
    print(format_summary(summary))
    if summary["accuracy"] is not None:
        accuracy_path(args.out).write_text(json.dumps(summary, indent=2))
        print(f"-> {args.out}, {accuracy_path(args.out)}")
    else:
        print(f"-> {args.out}")
    return 0
