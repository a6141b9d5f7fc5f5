"""Measuring the direction of motion in generated clips with our own decomposition."""

import numpy as np
import pytest

from videolavit.video.motion_direction import MotionEstimate, direction_agreement, measure_motion


def _moving_square(direction: tuple[int, int], size: int = 32, frames: int = 24, step: int = 1) -> np.ndarray:
    rng = np.random.default_rng(0)
    background = rng.integers(90, 110, size=(size, size, 3)).astype(np.uint8)
    out = np.repeat(background[None], frames, axis=0)
    for t in range(frames):
        x = size // 2 - 4 + direction[0] * (t * step // 2 - 6)
        y = size // 2 - 4 + direction[1] * (t * step // 2 - 6)
        out[t, y:y + 8, x:x + 8] = (220, 40, 40)
    return out


@pytest.mark.parametrize("name,vector", [("left", (-1, 0)), ("right", (1, 0)), ("up", (0, -1)), ("down", (0, 1))])
def test_measures_the_direction_of_a_moving_square(name, vector):
    estimate = measure_motion(_moving_square(vector))
    assert estimate.direction == name
    # 0.5 px per frame at 32 px: the estimate is in input pixels, not the upscaled ones
    along = estimate.dx * vector[0] + estimate.dy * vector[1]
    assert 0.2 < along < 1.0


def test_static_clip_has_no_direction_and_layout_is_accepted():
    still = np.repeat(_moving_square((1, 0))[:1], 24, axis=0)
    assert measure_motion(still.transpose(0, 3, 1, 2)).direction is None


def test_direction_agreement():
    assert direction_agreement(["left", None, "up", "up"], ["left", "down", "up", "down"]) == 0.5
    with pytest.raises(ValueError):
        direction_agreement(["left"], ["left", "up"])
    assert MotionEstimate(0.0, 0.0, 0).direction is None
