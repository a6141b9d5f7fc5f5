"""``python -m videolavit generate``: text-to-video, image-to-video and long video from trained exports.

    python -m videolavit generate --exports runs/tiny/exports --prompt "a red circle moving to the left" --out clip.mp4
    python -m videolavit generate --exports DIR --prompt "..." --image first_frame.png --out clip.mp4
    python -m videolavit generate --exports DIR --prompt "..." --clips 3 --out long.mp4   # 3 chained 4 s clips
    python -m videolavit generate --exports DIR --prompts-file prompts.txt --out-dir clips/   # one mp4 per line
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

HELP = "generate videos from text (or an image + text) with the trained exports; writes mp4 files"


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

    try:
        with Image.open(path) as image:
            pixels = np.asarray(image.convert("RGB"))
    except (FileNotFoundError, UnidentifiedImageError) as exc:
        raise ValueError(f"cannot read --image {path}: {exc}") from None
    return torch.from_numpy(pixels.copy()).permute(2, 0, 1)


def run(args: argparse.Namespace) -> int:
    from videolavit.inference.text_to_video import TextToVideo
    from videolavit.inference.video_chat import ModelDirectoryError
    from videolavit.models.export import ExportError
    from videolavit.video.motion_direction import motion_field_direction
    from videolavit.video.writer import write_mp4

    if args.prompt is not None and not args.out:
        print("error: --prompt needs --out FILE.mp4", file=sys.stderr)
        return 2
    if args.prompts_file is not None and not args.out_dir:
        print("error: --prompts-file needs --out-dir DIR", file=sys.stderr)
        return 2
    if args.clips < 1:
        print("error: --clips must be at least 1", file=sys.stderr)
        return 2
    try:
        prompts = [args.prompt] if args.prompt is not None else [
            line.strip() for line in Path(args.prompts_file).read_text().splitlines() if line.strip()]
        image = _load_image(args.image) if args.image else None
        pipeline = TextToVideo.from_directory(
            args.exports, llm=args.llm, device=args.device, video_steps=args.video_steps,
            keyframe_steps=args.keyframe_steps, keyframe_guidance=args.keyframe_guidance,
            motion_guidance=args.motion_guidance, temperature=args.temperature,
            keyframe_temperature=args.keyframe_temperature, keyframe_sampler=args.keyframe_sampler,
            long_video_start=args.long_video_start)
    except (ExportError, ModelDirectoryError, FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    outputs = [Path(args.out)] if args.prompt is not None else [
        Path(args.out_dir) / f"clip_{i:04d}.mp4" for i in range(len(prompts))]
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
