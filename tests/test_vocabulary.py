"""The unified vocabulary: release ids are exact, tiny layouts derive from sizes, bad codes are refused."""

import json

import numpy as np
import pytest
import torch

from videolavit.llm.vocabulary import (
    VOCABULARY_FILE,
    Modality,
    Vocabulary,
    VocabularyError,
    VocabularyFileError,
    read_vocabulary_file,
    write_vocabulary_file,
)


def test_release_ids_are_exact():
    v = Vocabulary.release()
    assert v == Vocabulary()
    assert v.image_start_id == 32000
    assert v.image_end_id == 32001
    assert v.visual_offset == 32002
    assert v.visual_id(0) == 32002
    assert v.visual_id(16383) == 48385
    assert v.motion_start_id == 48386
    assert v.motion_end_id == 48387
    assert v.motion_id(0) == 48388
    assert v.motion_id(1023) == 49411
    assert v.size == len(v) == 49412
    assert v.special_ids == (32000, 32001, 48386, 48387)
    assert v.visual_range == range(32002, 48386)
    assert v.motion_range == range(48388, 49412)
    assert v.text_range == range(0, 32000)


def test_release_matches_release_code_arithmetic():
    # The release adds 32000 + 16384 + 4 to motion codes and subtracts 32002 from keyframe ids.
    v = Vocabulary.release()
    assert v.motion_id(7) == 7 + 32000 + 16384 + 4
    assert v.visual_code(32002 + 9) == 9
    # motion_vocab_size=1026 in the release = 1024 codes + [MOV] + [/MOV]
    assert v.size - v.motion_start_id == 1026


def test_tiny_layout_derives_from_sizes():
    v = Vocabulary(text_size=10, visual_codes=5, motion_codes=3)
    assert v.special_ids == (10, 11, 17, 18)
    assert list(v.visual_range) == [12, 13, 14, 15, 16]
    assert list(v.motion_range) == [19, 20, 21]
    assert v.size == 22


def test_code_maps_round_trip_for_ints_lists_tensors_and_numpy():
    v = Vocabulary(text_size=10, visual_codes=5, motion_codes=3)
    assert v.visual_id([0, 4]) == [12, 16]
    assert v.motion_id(np.array([2, 0])) == [21, 19]
    assert v.motion_id(np.int64(1)) == 20
    t = torch.tensor([[0, 1], [2, 3]])
    assert torch.equal(v.visual_code(v.visual_id(t)), t)
    assert v.motion_code([19, 21]) == [0, 2]


@pytest.mark.parametrize("call,arg", [
    ("visual_id", 5), ("visual_id", -1), ("motion_id", 3), ("motion_id", [0, 3]),
    ("visual_code", 17), ("motion_code", 18), ("visual_id", torch.tensor([0, 5])),
    ("motion_id", torch.tensor([0.5])), ("visual_id", "3"), ("visual_id", True),
])
def test_out_of_range_codes_raise(call, arg):
    v = Vocabulary(text_size=10, visual_codes=5, motion_codes=3)
    with pytest.raises(VocabularyError):
        getattr(v, call)(arg)


def test_invalid_sizes_raise():
    with pytest.raises(VocabularyError):
        Vocabulary(text_size=0)


def test_predicates_and_modality_of():
    v = Vocabulary(text_size=10, visual_codes=5, motion_codes=3)
    ids = torch.tensor([0, 9, 10, 12, 16, 11, 17, 19, 21, 18])
    expected = [Modality.TEXT, Modality.TEXT, Modality.SPECIAL, Modality.KEYFRAME, Modality.KEYFRAME,
                Modality.SPECIAL, Modality.SPECIAL, Modality.MOTION, Modality.MOTION, Modality.SPECIAL]
    assert v.modality_of(ids).tolist() == [int(m) for m in expected]
    assert v.modality_of([[0, 12], [19, 18]]).shape == (2, 2)
    assert v.is_special(ids).tolist() == [False, False, True, False, False, True, True, False, False, True]
    assert v.is_visual(12) and not v.is_visual(17) and v.is_motion(21) and not v.is_motion(22)
    assert v.is_text([3, 10]) == [True, False]
    with pytest.raises(VocabularyError):
        v.modality_of([22])
    with pytest.raises(VocabularyError):
        v.modality_of([-1])


@pytest.mark.parametrize("vocab", [Vocabulary.release(), Vocabulary(text_size=512, visual_codes=256, motion_codes=64)],
                         ids=["release", "tiny"])
def test_the_vocabulary_file_round_trips_and_records_the_derived_ids(vocab, tmp_path):
    path = write_vocabulary_file(tmp_path, vocab)
    assert path == tmp_path / VOCABULARY_FILE
    assert read_vocabulary_file(tmp_path) == vocab
    record = json.loads(path.read_text())
    assert record["size"] == vocab.size and record["motion_offset"] == vocab.motion_offset
    assert (record["image_start_id"], record["image_end_id"], record["motion_start_id"], record["motion_end_id"]) \
        == vocab.special_ids


def test_a_sizes_only_vocabulary_file_reads(tmp_path):  # what release imports of earlier versions wrote
    (tmp_path / VOCABULARY_FILE).write_text(json.dumps({"text_size": 32000, "visual_codes": 16384,
                                                        "motion_codes": 1024, "size": 49412}))
    assert read_vocabulary_file(tmp_path) == Vocabulary.release()


@pytest.mark.parametrize("record,message", [
    (None, "has no videolavit_vocabulary.json"),
    ("not json", "not a readable vocabulary layout"),
    ({"text_size": 512, "visual_codes": 256}, "not a readable vocabulary layout"),
    ({"text_size": 0, "visual_codes": 256, "motion_codes": 64}, "not a readable vocabulary layout"),
    ({"text_size": 512, "visual_codes": 256, "motion_codes": 64, "size": 900}, "says size 900 but its sizes give 836"),
    ({"text_size": 512, "visual_codes": 256, "motion_codes": 64, "motion_offset": 1}, "says motion_offset 1"),
])
def test_broken_vocabulary_files_are_named_errors(record, message, tmp_path):
    if record is not None:
        (tmp_path / VOCABULARY_FILE).write_text(record if isinstance(record, str) else json.dumps(record))
    with pytest.raises(VocabularyFileError, match=message):
        read_vocabulary_file(tmp_path)
