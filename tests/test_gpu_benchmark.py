"""benchmarks/gpu.py stays runnable: its --tiny CPU check measures every stage it lists."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_the_gpu_benchmark_runs_tiny_on_cpu_and_ends_with_one_json_line():
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu.py"), "--tiny", "--steps", "1",
                           "--warmup", "0"], capture_output=True, text=True, timeout=300, env=env, cwd=REPO)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    stages = {r["stage"]: r for r in summary["results"]}
    assert set(stages) == {"llm", "motion_tokenizer", "keyframe_unet", "video_unet"}
    assert stages["llm"]["unit"] == "tokens/s" and stages["motion_tokenizer"]["unit"] == "clips/s"
    assert stages["keyframe_unet"]["unit"] == "images/s" and stages["video_unet"]["unit"] == "clips/s"
    assert stages["video_unet"]["resolution"] == "16x16x24"
    for result in stages.values():
        assert result["step_s"] > 0 and result["throughput"] > 0
        assert result["mfu"] is None  # no peak FLOP/s on CPU
