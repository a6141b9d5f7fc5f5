"""User errors of ``chat``, ``generate``, ``evaluate`` and ``synth``: one line on stderr naming what is wrong and
what to set, exit code 2, no traceback; outputs and bounds are checked before any model is loaded; hostile or
truncated exports reached through the commands are named errors that run nothing."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.test_instruct import pretrain_export, tokenizer_dir, tokenizer_exports  # noqa: F401  (module fixtures)
from tests.test_text_to_video import exports  # noqa: F401
from videolavit.__main__ import main


def one_line_error(capsys) -> str:
    """The one error line, last on stderr (progress bars of loaders that ran before it may precede it)."""
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    errors = [line for line in lines if line.startswith("error")]
    assert len(errors) == 1 and lines[-1] == errors[0] and errors[0].startswith("error: "), captured.err
    assert "Traceback" not in captured.err + captured.out
    return errors[0]


@pytest.fixture
def no_loading(monkeypatch):
    """Loading a model counts as work: an argument error must be reported before it."""
    from videolavit.inference import text_to_video, video_chat

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the arguments were checked")

    monkeypatch.setattr(text_to_video.TextToVideo, "from_directory", refuse)
    monkeypatch.setattr(video_chat.VideoChat, "__init__", refuse)


@pytest.fixture
def inputs(tmp_path) -> dict[str, Path]:
    (tmp_path / "videos").mkdir()
    (tmp_path / "exports").mkdir()
    video = tmp_path / "videos" / "a.mp4"
    video.write_bytes(b"not decoded before the arguments are checked")
    qa = tmp_path / "qa.json"
    qa.write_text(json.dumps([{"video_id": "a", "question": "q?", "answer": "up"}]))
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("un caf\xe9 qui bouge\n".encode("latin-1"))
    (tmp_path / "dir.mp4").mkdir()
    prompts_csv = tmp_path / "prompts.csv"
    prompts_csv.write_text("prompt\na red circle\n")
    return {"tmp": tmp_path, "dir_mp4": tmp_path / "dir.mp4", "video": video, "qa": qa, "latin1": latin1, "csv": prompts_csv}


def generate(i, *extra: str) -> list[str]:
    return ["generate", "--exports", str(i["tmp"] / "exports"), *extra]


def chat_one(i, *extra: str) -> list[str]:
    return ["chat", "--model", str(i["tmp"] / "m"), "--tokenizers", str(i["tmp"] / "t"), "--video", str(i["video"]),
            "--question", "which way?", *extra]


def chat_batch(i, *extra: str) -> list[str]:
    return ["chat", "--model", str(i["tmp"] / "m"), "--tokenizers", str(i["tmp"] / "t"), "--qa-file", str(i["qa"]),
            "--videos", str(i["tmp"] / "videos"), *extra]


def evaluate(i, *extra: str) -> list[str]:
    return ["evaluate", "--protocol", "csv", "--root", str(i["csv"]), "--pipeline", str(i["tmp"] / "exports"),
            "--clip", str(i["tmp"] / "clip"), *extra]


CASES = {
    # name: (argv builder, expected text in the message)
    "generate_out_in_proc": (lambda i: generate(i, "--prompt", "p", "--out", "/proc/no_such_dir/clip.mp4"),
                             "--out: directory /proc/no_such_dir is not writable"),
    "generate_out_is_a_directory": (lambda i: generate(i, "--prompt", "p", "--out", str(i["tmp"] / "videos")) + [
        "--out", str(i["dir_mp4"])], "dir.mp4 is a directory"),
    "generate_out_not_mp4": (lambda i: generate(i, "--prompt", "p", "--out", str(i["tmp"] / "c.txt")),
                             "must end in .mp4"),
    "generate_zero_clips": (lambda i: generate(i, "--prompt", "p", "--out", str(i["tmp"] / "c.mp4"), "--clips", "0"),
                            "--clips must be >= 1"),
    "generate_absurd_clips": (lambda i: generate(i, "--prompt", "p", "--out", str(i["tmp"] / "c.mp4"), "--clips",
                                                 "1000000"), "--clips must be >= 1 and <= 100, got 1e+06"),
    "generate_zero_steps": (lambda i: generate(i, "--prompt", "p", "--out", str(i["tmp"] / "c.mp4"),
                                               "--video-steps", "0"), "--video-steps must be >= 1"),
    "generate_nan_temperature": (lambda i: generate(i, "--prompt", "p", "--out", str(i["tmp"] / "c.mp4"),
                                                    "--temperature", "nan"), "--temperature must be >= 0, got nan"),
    "generate_empty_prompt": (lambda i: generate(i, "--prompt", " ", "--out", str(i["tmp"] / "c.mp4")),
                              "--prompt is empty"),
    "generate_missing_image": (lambda i: generate(i, "--prompt", "p", "--out", str(i["tmp"] / "c.mp4"), "--image",
                                                  str(i["tmp"] / "no.png")), "--image"),
    "generate_prompts_not_utf8": (lambda i: generate(i, "--prompts-file", str(i["latin1"]), "--out-dir",
                                                     str(i["tmp"] / "clips")), "is not UTF-8 text"),
    "generate_prompts_missing": (lambda i: generate(i, "--prompts-file", str(i["tmp"] / "none.txt"), "--out-dir",
                                                    str(i["tmp"] / "clips")), "none.txt does not exist"),
    "generate_out_dir_is_a_file": (lambda i: generate(i, "--prompts-file", str(i["csv"]), "--out-dir",
                                                      str(i["csv"])), "--out-dir"),
    "chat_zero_new_tokens": (lambda i: chat_one(i, "--max-new-tokens", "0"), "--max-new-tokens must be >= 1"),
    "chat_absurd_new_tokens": (lambda i: chat_one(i, "--max-new-tokens", "10000000"), "<= 4096"),
    "chat_zero_clips": (lambda i: chat_one(i, "--max-clips", "0"), "--max-clips must be >= 1"),
    "chat_top_p": (lambda i: chat_one(i, "--top-p", "0"), "--top-p must be > 0 and <= 1"),
    "chat_missing_video": (lambda i: chat_one(i)[:-4] + ["--video", str(i["tmp"] / "gone.mp4"), "--question", "q"],
                           "--video " + "{tmp}/gone.mp4 does not exist"),
    "chat_out_in_proc": (lambda i: chat_batch(i, "--out", "/proc/no_such_dir/p.jsonl"), "--out: directory /proc"),
    "chat_videos_missing": (lambda i: ["chat", "--model", "m", "--tokenizers", "t", "--qa-file", str(i["qa"]),
                                       "--videos", str(i["tmp"] / "nope"), "--out", str(i["tmp"] / "p.jsonl")],
                            "--videos {tmp}/nope is not a directory"),
    "chat_qa_not_utf8": (lambda i: [a if a != str(i["qa"]) else str(i["latin1"])
                                    for a in chat_batch(i, "--out", str(i["tmp"] / "p.jsonl"))], "is not UTF-8 text"),
    "evaluate_out_in_proc": (lambda i: evaluate(i, "--out", "/proc/no_such_dir/r.json"), "--out: directory /proc"),
    "evaluate_save_fps": (lambda i: evaluate(i, "--out", str(i["tmp"] / "r.json"), "--save-fps", "0"),
                          "--save-fps must be >= 1"),
    "evaluate_save_videos_is_a_file": (lambda i: evaluate(i, "--out", str(i["tmp"] / "r.json"), "--save-videos",
                                                          str(i["csv"])), "--save-videos"),
    "synth_zero_videos": (lambda i: ["synth", "--out", str(i["tmp"] / "c"), "--num-videos", "0", "--seed", "0"],
                          "--num-videos must be >= 1"),
    "synth_zero_workers": (lambda i: ["synth", "--out", str(i["tmp"] / "c"), "--num-videos", "1", "--seed", "0",
                                      "--workers", "0"], "--workers must be >= 1"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_user_errors_are_one_line_exit_2_before_any_loading(case, inputs, no_loading, capsys):
    argv, expected = CASES[case]
    assert main(argv(inputs)) == 2
    assert expected.format(tmp=inputs["tmp"]) in one_line_error(capsys)
    assert not (inputs["tmp"] / "c.mp4").exists()


def test_a_missing_exports_directory_is_named(inputs, capsys):
    missing = inputs["tmp"] / "missing"
    assert main(["generate", "--exports", str(missing), "--prompt", "p", "--out", str(inputs["tmp"] / "c.mp4")]) == 2
    assert f"exports directory {missing} does not exist" in one_line_error(capsys)


def test_from_a_shell_the_process_exits_2_with_one_line(tmp_path):
    result = subprocess.run([sys.executable, "-m", "videolavit", "generate", "--exports", str(tmp_path), "--prompt",
                             "a red circle", "--out", "/proc/no_such_dir/clip.mp4"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: --out: directory /proc/no_such_dir is not writable (No such file or directory); set --out to a "
        "writable location"]


# ---- hostile and truncated exports through the commands --------------------------------------------------

def poison(directory: Path, name: str, marker: Path) -> None:
    """Make ``{name}.json`` name ``subprocess.Popen`` with a shell command that creates ``marker``."""
    record = json.loads((directory / f"{name}.json").read_text())
    record.update(class_path="subprocess.Popen", config={"args": f"touch {marker}", "shell": True})
    record.pop("config_class", None)
    (directory / f"{name}.json").write_text(json.dumps(record))


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def test_generate_refuses_a_hostile_motion_tokenizer_export_and_runs_nothing(exports, tmp_path, capsys):  # noqa: F811
    root = tmp_path / "exports"
    shutil.copytree(exports, root)
    marker = tmp_path / "pwned"
    poison(root, "motion_tokenizer", marker)
    out = tmp_path / "clip.mp4"
    assert main(["generate", "--exports", str(root), "--prompt", "a red circle", "--out", str(out),
                 "--video-steps", "2", "--keyframe-steps", "2"]) == 2
    message = one_line_error(capsys)
    assert "class_path 'subprocess.Popen'" in message and "videolavit.models.motion_tokenizer.MotionTokenizer" in message
    assert not marker.exists() and not out.exists()


def test_generate_names_a_truncated_export_file(exports, tmp_path, capsys):  # noqa: F811
    root = tmp_path / "exports"
    shutil.copytree(exports, root)
    weights = root / "video_detokenizer" / "video_detokenizer.safetensors"
    truncate(weights)
    assert main(["generate", "--exports", str(root), "--prompt", "a red circle", "--out",
                 str(tmp_path / "clip.mp4")]) == 2
    message = one_line_error(capsys)
    assert str(weights) in message and "truncated" in message


def test_chat_refuses_a_hostile_tokenizer_export_and_runs_nothing(pretrain_export, tokenizer_exports,  # noqa: F811
                                                                   synthetic_corpus, tmp_path, capsys):
    tokenizers = tmp_path / "tokenizers"
    shutil.copytree(tokenizer_exports, tokenizers)
    marker = tmp_path / "pwned"
    poison(tokenizers, "motion_tokenizer", marker)
    video = sorted((synthetic_corpus / "videos").glob("*.mp4"))[0]
    assert main(["chat", "--model", str(pretrain_export), "--tokenizers", str(tokenizers), "--video", str(video),
                 "--question", "Which way?", "--max-new-tokens", "2"]) == 2
    assert "class_path 'subprocess.Popen'" in one_line_error(capsys)
    assert not marker.exists()

    shutil.copy(tokenizer_exports / "motion_tokenizer.json", tokenizers / "motion_tokenizer.json")
    truncate(tokenizers / "keyframe_tokenizer.safetensors")
    assert main(["chat", "--model", str(pretrain_export), "--tokenizers", str(tokenizers), "--video", str(video),
                 "--question", "Which way?", "--max-new-tokens", "2"]) == 2
    assert str(tokenizers / "keyframe_tokenizer.safetensors") in one_line_error(capsys)
