"""The ``chat`` command and VideoChat: batch mode's JSONL and accuracy (with a stub answer function), the QA
file formats, named errors for a missing/corrupt model directory and for corrupt or too-short videos, and a
single answer from a real tiny export."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from tests.test_instruct import (  # noqa: F401  (module fixtures, rebuilt for this module)
    VOCAB,
    pretrain_export,
    tokenizer_dir,
    tokenizer_exports,
)
from tests.video_factory import moving_square_frames, write_video
from videolavit.commands import chat
from videolavit.evaluation.qa_score import QAScore, normalize_answer
from videolavit.inference.video_chat import ModelDirectoryError, TokenizerExportError, VideoChat, VideoInputError
from videolavit.video import errors


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    chat.add_arguments(parser)
    return parser.parse_args(list(argv))


def synthetic_qa(path: Path, videos: dict[str, tuple[str, str, str]]) -> Path:
    items = [{"video_id": v, "question": q, "answer": a, "attribute": attr}
             for v, answers in videos.items()
             for q, a, attr in zip(("Which shape?", "Which colour?", "Which way?"), answers,
                                   ("shape", "color", "direction"))]
    path.write_text(json.dumps(items))
    return path


STUB_PREDICTIONS = {  # per video, per question: the stub's answers
    "a": {"Which shape?": "Circle.", "Which colour?": "blue", "Which way?": "up"},
    "b": {"Which shape?": "star", "Which colour?": "green!", "Which way?": "moving left"},
}


def stub_answer(path: Path, questions: list[str]) -> list[str]:
    return [STUB_PREDICTIONS[path.stem][q] for q in questions]


# ------------------------------------------------------------------------------------------- batch mode
def test_batch_mode_writes_video_chatgpt_jsonl_and_accuracy_per_attribute(tmp_path):
    qa = synthetic_qa(tmp_path / "qa.json", {"a": ("circle", "red", "up"), "b": ("star", "green", "left"),
                                             "c": ("square", "blue", "down")})
    (tmp_path / "videos").mkdir()
    for name in ("a", "b"):  # c has no video file
        (tmp_path / "videos" / f"{name}.mp4").write_bytes(b"stub")
    summary = chat.answer_qa_file(chat.read_eval_questions(qa), tmp_path / "videos", tmp_path / "out" / "p.jsonl",
                                  stub_answer)
    lines = [json.loads(line) for line in (tmp_path / "out" / "p.jsonl").read_text().splitlines()]
    assert len(lines) == 6 and all(set(line) == {"id", "video_name", "question", "answer", "pred", "attribute"}
                                   for line in lines)
    assert lines[0] == {"id": "a#0", "video_name": "a", "question": "Which shape?", "answer": "circle",
                        "pred": "Circle.", "attribute": "shape"}
    assert summary["skipped"] == {chat.VIDEO_NOT_FOUND: 1} and summary["answered"] == 6
    accuracy = summary["accuracy"]
    # a: circle ok (case/punctuation), blue != red, up ok; b: star ok, green ok, "moving left" != left
    assert (accuracy["correct"], accuracy["total"]) == (4, 6)
    assert accuracy["per_attribute"] == {"shape": {"accuracy": 1.0, "correct": 2, "total": 2},
                                         "color": {"accuracy": 0.5, "correct": 1, "total": 2},
                                         "direction": {"accuracy": 0.5, "correct": 1, "total": 2}}


def test_the_command_prints_and_writes_the_accuracy(tmp_path, monkeypatch, capsys):
    qa = synthetic_qa(tmp_path / "qa.json", {"a": ("circle", "red", "up"), "b": ("star", "green", "left")})
    (tmp_path / "videos").mkdir()
    for name in ("a", "b"):
        (tmp_path / "videos" / f"{name}.mp4").write_bytes(b"stub")

    class StubChat:
        def __init__(self, *args, **kwargs):
            pass

        def answer_many(self, path, questions, **kwargs):
            return stub_answer(Path(path), questions)

    monkeypatch.setattr("videolavit.inference.video_chat.VideoChat", StubChat)
    out = tmp_path / "predictions.jsonl"
    assert chat.run(parse("--model", "m", "--tokenizers", "t", "--qa-file", str(qa), "--videos",
                          str(tmp_path / "videos"), "--out", str(out))) == 0
    printed = capsys.readouterr().out
    assert "accuracy 0.667 (4/6)" in printed and "direction    0.500 (1/2)" in printed
    written = json.loads((tmp_path / "predictions.accuracy.json").read_text())
    assert written["accuracy"]["accuracy"] == pytest.approx(4 / 6)
    assert len(out.read_text().splitlines()) == 6


def test_video_chatgpt_evaluation_files_are_read_and_free_form_answers_get_no_accuracy(tmp_path):
    qa = tmp_path / "generic_qa.json"
    qa.write_text(json.dumps([{"video_name": "a", "Q": "What happens?", "A": "A man rides a red bike.",
                               "question_id": "q17"}]))
    (tmp_path / "videos").mkdir()
    (tmp_path / "videos" / "a.mkv").write_bytes(b"stub")
    questions = chat.read_eval_questions(qa)
    assert questions == [{"id": "q17", "video_name": "a", "question": "What happens?",
                          "answer": "A man rides a red bike.", "attribute": None}]
    summary = chat.answer_qa_file(questions, tmp_path / "videos", tmp_path / "p.jsonl",
                                  lambda path, qs: ["a red bike" for _ in qs])
    assert summary["accuracy"] is None and summary["answered"] == 1
    assert json.loads((tmp_path / "p.jsonl").read_text()) == {"id": "q17", "video_name": "a",
                                                              "question": "What happens?",
                                                              "answer": "A man rides a red bike.", "pred": "a red bike"}
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"Q": "no video named"}]))
    with pytest.raises(ValueError, match="needs a video"):
        chat.read_eval_questions(bad)


def test_answers_match_after_normalisation_only():
    assert normalize_answer("  Circle. ") == normalize_answer("circle") == "circle"
    score = QAScore()
    assert score.update("Up!", "up", "direction") and not score.update("upward", "up", "direction")
    assert not score.update("red circle", "circle", "shape")
    assert (score.correct, score.total) == (1, 3)
    assert score.attribute_accuracy() == {"direction": 0.5, "shape": 0.0}


def test_the_command_needs_one_mode(capsys):
    assert chat.run(parse("--model", "m", "--tokenizers", "t", "--video", "x.mp4")) == 2
    assert chat.run(parse("--model", "m", "--tokenizers", "t", "--video", "x.mp4", "--question", "q",
                          "--qa-file", "qa.json")) == 2
    assert "either --video and --question" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------- named errors
def test_a_missing_or_corrupt_model_directory_is_a_named_error(tmp_path, tokenizer_exports, pretrain_export,
                                                               capsys):
    with pytest.raises(ModelDirectoryError, match="does not exist"):
        VideoChat(tmp_path / "nowhere", tokenizer_exports)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelDirectoryError, match="no config.json"):
        VideoChat(tmp_path / "empty", tokenizer_exports)
    broken = tmp_path / "broken"
    broken.mkdir()
    for item in Path(pretrain_export).iterdir():
        (broken / item.name).write_bytes(item.read_bytes())
    (broken / "model.safetensors").write_bytes(b"\x00" * 64)  # truncated weights
    with pytest.raises(ModelDirectoryError, match="cannot load the LLM"):
        VideoChat(broken, tokenizer_exports)
    with pytest.raises(TokenizerExportError, match="no motion_tokenizer"):
        VideoChat(pretrain_export, tmp_path / "empty")
    motion_only = tmp_path / "motion_only"
    motion_only.mkdir()
    for item in Path(tokenizer_exports).glob("motion_tokenizer.*"):
        (motion_only / item.name).write_bytes(item.read_bytes())
    with pytest.raises(TokenizerExportError, match="keyframe_source='none'"):
        VideoChat(pretrain_export, motion_only)

    video = tmp_path / "v.mp4"
    video.write_bytes(b"x")
    assert chat.run(parse("--model", str(tmp_path / "nowhere"), "--tokenizers", str(tokenizer_exports),
                          "--video", str(video), "--question", "q")) == 2
    assert "error: LLM directory" in capsys.readouterr().err


@pytest.fixture(scope="module")
def video_chat(pretrain_export, tokenizer_exports) -> VideoChat:
    return VideoChat(pretrain_export, tokenizer_exports)


def test_corrupt_and_too_short_videos_are_named_errors(video_chat, tmp_path, pretrain_export, tokenizer_exports,
                                                       capsys):
    corrupt = tmp_path / "corrupt.mp4"
    corrupt.write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 8)
    with pytest.raises(VideoInputError, match="unreadable") as info:
        video_chat.answer(corrupt, "What shape is it?")
    assert info.value.reason == errors.UNREADABLE
    short = write_video(tmp_path / "short.mp4", moving_square_frames(64, 64, 24, (1.0, 0.0)), fps=12)  # 2 s
    with pytest.raises(VideoInputError, match="too_short") as info:
        video_chat.answer(short, "What shape is it?")
    assert info.value.reason == errors.TOO_SHORT

    assert chat.run(parse("--model", str(pretrain_export), "--tokenizers", str(tokenizer_exports),
                          "--video", str(corrupt), "--question", "q")) == 2
    assert "cannot use this video (unreadable)" in capsys.readouterr().err


def test_batch_mode_skips_bad_videos_and_answers_the_rest(video_chat, synthetic_corpus, tmp_path):
    videos = tmp_path / "videos"
    videos.mkdir()
    good = sorted((synthetic_corpus / "videos").glob("*.mp4"))[0]
    (videos / "good.mp4").write_bytes(good.read_bytes())
    (videos / "bad.mp4").write_bytes(b"garbage" * 10)
    qa = synthetic_qa(tmp_path / "qa.json", {"good": ("circle", "red", "up"), "bad": ("star", "green", "left")})
    summary = chat.answer_qa_file(chat.read_eval_questions(qa), videos, tmp_path / "p.jsonl",
                                  lambda path, qs: video_chat.answer_many(path, qs, max_new_tokens=2))
    assert summary["skipped"] == {errors.UNREADABLE: 1} and summary["answered"] == 3
    assert summary["accuracy"]["total"] == 3


def test_a_single_question_prints_the_answer(video_chat, synthetic_corpus, pretrain_export, tokenizer_exports,
                                             capsys):
    video = sorted((synthetic_corpus / "videos").glob("*.mp4"))[0]
    expected = video_chat.answer(video, "Which color does the shape have?", max_new_tokens=3)
    assert chat.run(parse("--model", str(pretrain_export), "--tokenizers", str(tokenizer_exports), "--video",
                          str(video), "--question", "Which color does the shape have?", "--max-new-tokens", "3")) == 0
    assert capsys.readouterr().out == expected + "\n"
    prompt = video_chat.prompt_ids(video_chat.video_ids(video), "Which color does the shape have?")
    assert prompt[-len(video_chat.tokenizer("ASSISTANT:", add_special_tokens=False)["input_ids"]):] == \
        video_chat.tokenizer("ASSISTANT:", add_special_tokens=False)["input_ids"]
    assert VOCAB.image_start_id in prompt and VOCAB.motion_start_id in prompt
