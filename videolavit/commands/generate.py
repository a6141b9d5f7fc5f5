"""``python -m videolavit generate``: text-to-video, image-to-video and long video from trained exports.

    python -m videolavit generate --exports runs/tiny/exports --prompt "a red circle moving to the left" --out clip.mp4
    python -m videolavit generate --exports DIR --prompt "..." --image first_frame.png --out clip.mp4
    python -m videolavit generate --exports DIR --prompt "..." --clips 3 --out long.mp4   # 3 chained 4 s clips
    python -m videolavit generate --exports DIR --prompts-file prompts.txt --out-dir clips/   # one mp4 per line
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from videolavit.commands.user_errors import (
    UsageError,
    check_input_file,
    check_output_dir,
    check_output_file,
    check_range,
    fail,
    read_text_file,
)

HELP = "generate videos from text (or an image + text) with the trained exports; writes mp4 files"
MAX_CLIPS = 100  # chained 4 s clips: beyond this a typo, not a video (each clip is a full g_I + g_V pass)
MAX_STEPS = 1000  # sampler steps: the diffusion schedules have 1000 training timesteps
MAX_FPS = 240


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--exports", required=True, help="directory of the stage exports (tokenizers, detokenizers, "
                                                         "instruct/ or pretrain/ LLM)")
    parser.add_argument("--llm", default=None, help="LLM directory (default: EXPORTS/pretrain, as the release generates with its pre-trained LLM; else EXPORTS/instruct)")
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--prompt", help="the text prompt")
    what.add_argument("--prompts-file", help="a text file, one prompt per line (writes --out-dir/clip_NNNN.mp4)")
    parser.add_argument("--out", help="output mp4 (with --prompt)")
    parser.add_argument("--out-dir", help="output directory (with --prompts-file)")
    parser.add_argument("--image", help="image-to-video: the first keyframe (any image PIL reads)")
    parser.add_argument("--clips", type=int, default=1, help="clips of 24 frames (4 s) to chain (default 1)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--video-steps", type=int, default=25, help="g_V Euler steps (release 25)")
    parser.add_argument("--keyframe-steps", type=int, default=None, help="g_I steps (default: its config)")
    parser.add_argument("--keyframe-sampler", choices=["euler", "ddim", "euler_ancestral"], default=None,
                        help="g_I sampler (default: its config; the release's DDIM / ancestral Euler need a "
                             "discrete-time g_I, e.g. an imported one)")
    parser.add_argument("--keyframe-guidance", type=float, default=4.0, help="LLM CFG scale for keyframe codes")
    parser.add_argument("--motion-guidance", type=float, default=7.0, help="LLM CFG scale for motion codes")
    parser.add_argument("--temperature", type=float, default=1.0, help="LLM sampling temperature (0: greedy)")
    parser.add_argument("--keyframe-temperature", type=float, default=None,
                        help="the keyframe block's own temperature (default: --temperature)")
    parser.add_argument("--long-video-start", choices=["noise", "invert"], default="noise",
                        help="how later keyframes start from the previous clip's last frame (release: noise; "
                             "paper eq. 4: invert)")
    parser.add_argument("--fps", type=int, default=6, help="playback rate of the mp4 (the decomposition's 6 fps)")


def _load_image(path: str):
    import numpy as np
    import torch
    from PIL import Image, UnidentifiedImageError

    check_input_file("--image", path, "image file")
    try:
        with Image.open(path) as image:
            pixels = np.asarray(image.convert("RGB"))
    except (OSError, UnidentifiedImageError) as exc:
        raise UsageError(f"cannot read --image {path} as an image: {exc}") from None
    return torch.from_numpy(pixels.copy()).permute(2, 0, 1)


def check_arguments(args: argparse.Namespace) -> tuple[list[str], list[Path]]:
    """``(prompts, output paths)``; raises :class:`UsageError` for a value that cannot work, before any loading."""
    if args.prompt is not None and not args.out:
        raise UsageError("--prompt needs --out FILE.mp4")
    if args.prompts_file is not None and not args.out_dir:
        raise UsageError("--prompts-file needs --out-dir DIR")
    check_range("--clips", args.clips, 1, MAX_CLIPS)
    check_range("--video-steps", args.video_steps, 1, MAX_STEPS)
    check_range("--keyframe-steps", args.keyframe_steps, 1, MAX_STEPS)
    check_range("--fps", args.fps, 1, MAX_FPS)
    check_range("--temperature", args.temperature, 0)
    check_range("--keyframe-temperature", args.keyframe_temperature, 0)
    check_range("--keyframe-guidance", args.keyframe_guidance)
    check_range("--motion-guidance", args.motion_guidance)
    if args.prompt is not None:
        if not args.prompt.strip():
            raise UsageError("--prompt is empty; give the text to generate from")
        if Path(args.out).suffix.lower() != ".mp4":
            raise UsageError(f"--out {args.out} must end in .mp4 (the command writes mp4 files)")
        if args.out_dir:
            check_output_dir("--out-dir", args.out_dir)  # generated.jsonl goes there
        return [args.prompt], [check_output_file("--out", args.out)]
    prompts = [line.strip() for line in read_text_file("--prompts-file", args.prompts_file).splitlines()
               if line.strip()]
    if not prompts:
        raise UsageError(f"--prompts-file {args.prompts_file} holds no prompt (one per line)")
    out_dir = check_output_dir("--out-dir", args.out_dir)
    return prompts, [out_dir / f"clip_{i:04d}.mp4" for i in range(len(prompts))]


def run(args: argparse.Namespace) -> int:
    from videolavit.inference.text_to_video import TextToVideo
    from videolavit.inference.video_chat import ModelDirectoryError
    from videolavit.models.export import ExportError
    from videolavit.video.motion_direction import motion_field_direction
    from videolavit.video.writer import write_mp4

    try:
        prompts, outputs = check_arguments(args)
        image = _load_image(args.image) if args.image else None
        pipeline = TextToVideo.from_directory(
            args.exports, llm=args.llm, device=args.device, video_steps=args.video_steps,
            keyframe_steps=args.keyframe_steps, keyframe_guidance=args.keyframe_guidance,
            motion_guidance=args.motion_guidance, temperature=args.temperature,
            keyframe_temperature=args.keyframe_temperature, keyframe_sampler=args.keyframe_sampler,
            long_video_start=args.long_video_start)
        if image is not None and pipeline.video_coder is None:
            raise UsageError(f"--image needs the keyframe_tokenizer export in --exports {args.exports} "
                             "(image-to-video tokenises the image)")
    except (UsageError, ExportError, ModelDirectoryError, FileNotFoundError, ValueError) as exc:
        return fail(exc)
    records = []
    for index, (prompt, out) in enumerate(zip(prompts, outputs)):
        start = time.time()
        frames, clips = pipeline.generate_with_tokens(prompt, num_clips=args.clips, image=image,
                                                      seed=args.seed + index)
        write_mp4(frames.permute(0, 2, 3, 1).numpy(), out, fps=args.fps)
        # What the LLM wrote, per clip: keyframe length (0: the given image) and the direction of its motion
        # codes as the motion tokenizer decodes them, before g_I and g_V render anything.
        tokens = [{"keyframe_codes": len(clip.keyframe), "motion_codes": len(clip.motion),
                   "motion_direction": motion_field_direction(pipeline.motion_field(clip.motion))} for clip in clips]
        records.append({"prompt": prompt, "video": str(out), "frames": int(frames.shape[0]),
                        "height": int(frames.shape[2]), "width": int(frames.shape[3]), "fps": args.fps,
                        "seed": args.seed + index, "clips": tokens})
        print(f"[{index + 1}/{len(prompts)}] {out}: {frames.shape[0]} frames {frames.shape[3]}x{frames.shape[2]} "
              f"in {time.time() - start:.1f} s", flush=True)
    if args.out_dir:
        (Path(args.out_dir) / "generated.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return 0
