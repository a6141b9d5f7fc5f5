"""LLM text-to-video generation as the release: greedy ids equal to the release code's on the same random
tiny Llama (reference from its generate_image_tokenids / generate_motion_tokenids, tests/data/README.md)."""

from __future__ import annotations

import pytest
import torch

from tests import release_fixtures as F
from videolavit.llm.visual_generation import SamplingOptions, generate_clips
from videolavit.llm.vocabulary import Vocabulary


@pytest.fixture(scope="module")
def llm():
    return F.tiny_release_llm()


@pytest.fixture(scope="module")
def reference():
    return F.load_reference()["llm_text_to_video_greedy"]


def release_options(reference, **overrides) -> SamplingOptions:
    n = reference["max_new_tokens"]
    values = dict(motion_max_length=n, temperature=0.0, keyframe_guidance=reference["keyframe_guidance"],
                  motion_guidance=reference["motion_guidance"])
    return SamplingOptions.release(motion_length=135, keyframe_max_length=n, **{**values, **overrides})


def release_blocks(ids: list[int], vocab: Vocabulary) -> tuple[list[int], list[int]]:
    """The codes of the release's output ids, as its video_decoding prunes them (motion padded to 135)."""
    keyframe = [t - vocab.visual_offset for t in ids if t in vocab.visual_range]
    motion = [t - vocab.motion_offset for t in ids if t in vocab.motion_range]
    return keyframe, (motion + [0] * 135)[:135]


def test_greedy_text_to_video_ids_equal_the_release(llm, reference):
    vocab = Vocabulary.release()
    clip = generate_clips(llm, vocab, reference["prompt"], 1, release_options(reference))[0]
    keyframe, motion = release_blocks(reference["output_ids"], vocab)
    assert len(keyframe) >= 20 and vocab.image_end_id in reference["output_ids"]  # the blocks ended on a marker
    assert clip.keyframe == keyframe
    assert clip.motion == motion and len(clip.motion) == 135


def test_our_behaviour_differs_where_the_release_s_does(llm, reference):
    vocab = Vocabulary.release()
    release_keyframe, release_motion = release_blocks(reference["output_ids"], vocab)
    history = generate_clips(llm, vocab, reference["prompt"], 1, release_options(reference, unconditional="history"))[0]
    assert (history.keyframe, history.motion) != (release_keyframe, release_motion)  # ours: the history branch
    short = generate_clips(llm, vocab, reference["prompt"], 1,
                           release_options(reference, keyframe_min_length=1))[0]
    assert len(short.keyframe) < 20 or short.keyframe != release_keyframe


def test_release_motion_blocks_are_padded_or_truncated_to_the_motion_length(llm, reference):
    vocab = Vocabulary.release()
    capped = generate_clips(llm, vocab, reference["prompt"], 2,
                            release_options(reference, motion_min_length=5, motion_max_length=8))
    assert all(len(clip.motion) == 135 for clip in capped)
    assert all(clip.motion[8:] == [0] * 127 for clip in capped)  # at most 8 generated, then code 0
    with pytest.raises(ValueError, match="unconditional"):
        SamplingOptions(motion_length=135, keyframe_max_length=8, unconditional="none")
