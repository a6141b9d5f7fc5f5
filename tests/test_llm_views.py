"""Stage-2 token view: golden id layout of video-text pairs (both orders, with and without keyframes),
codes from frozen tokenizers equal the tokenizers' own output, token dumps, text-only mixing, packing,
and a deterministic validation stream (whatever the number of workers)."""

from __future__ import annotations

import csv
import json
import random
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from callbacks.token_dump import FORMAT, FORMAT_VERSION
from datamodules.llm_views import MISSING_TOKENS, PretrainSequenceView
from datamodules.sample_format import decode_sample, encode_sample
from datamodules.skip_tracker import SKIPS
from datamodules.tar_reader import iter_tar_samples
from datamodules.shard_list import resolve_shards
from datamodules.video_datamodule import VideoDataModule
from videolavit.llm.sequences import IGNORE_INDEX, PAD_DOCUMENT_ID
from videolavit.llm.text_tokenizer import BOS_ID, EOS_ID, build_tiny_tokenizer
from videolavit.llm.vocabulary import Vocabulary
from videolavit.video.clips import clip_motion
from videolavit.video.frames import decode_keyframes
from videolavit.video.motion_grid import TOKENIZER_SCALE

X = IGNORE_INDEX
# [IMG]=300 [/IMG]=301 keyframe codes 302..306 [MOV]=307 [/MOV]=308 motion codes 309..312
TINY = Vocabulary(text_size=300, visual_codes=5, motion_codes=4)
CAPTION = "a red circle moving up"
L = 64  # packed row length of the golden tests




@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory, synthetic_corpus) -> Path:
    with open(synthetic_corpus / "captions.csv") as handle:
        captions = [row["name"] for row in csv.DictReader(handle)]
    out = tmp_path_factory.mktemp("tokenizer")
    build_tiny_tokenizer(out, captions + [CAPTION], vocab_size=TINY.text_size)
    return out


def write_dump(directory: Path, name: str, records: dict[tuple[str, int], list[int]], num_codes: int) -> Path:
    """A finished dump in the ``callbacks.token_dump`` format (one rank file + manifest)."""
    directory.mkdir(parents=True, exist_ok=True)
    file_name = f"{name}_tokens.rank00000.jsonl"
    with open(directory / file_name, "w") as handle:
        for (key, start), ids in records.items():
            handle.write(json.dumps({"key": key, "clip_start": start, f"{name}_ids": ids}) + "\n")
    (directory / f"{name}_tokens.json").write_text(json.dumps({
        "format": FORMAT, "format_version": FORMAT_VERSION, "name": name, "files": [file_name],
        "clips": len(records), "num_tokens": None, "token_grid": None, "num_codes": num_codes}))
    return directory


def raw_sample(key: str, caption: str = CAPTION, num_frames: int = 60) -> dict:
    """A shard sample without a real video (dump-based views never decode it): clips start at 12 and 36."""
    meta = {"source_id": key, "width": 96, "height": 96, "fps": 6, "num_frames": num_frames,
            "iframes": list(range(0, num_frames, 12))}
    return encode_sample(key, caption, meta, b"", np.zeros((num_frames, 2, 6, 6), np.float16))


def golden_dump(tmp_path: Path) -> Path:
    write_dump(tmp_path, "keyframe", {("vid_a", 12): [4, 0, -1], ("vid_a", 36): [1, -1, -1]}, TINY.visual_codes)
    return write_dump(tmp_path, "motion", {("vid_a", 12): [0, 3], ("vid_a", 36): [2, 2]}, TINY.motion_codes)


def dump_view(tokenizer_dir, dump, **kwargs) -> PretrainSequenceView:
    args = dict(tokenizer_path=str(tokenizer_dir), vocabulary=TINY, seq_len=L, motion_source="dump",
                keyframe_source="dump", token_dump=str(dump), open_rows=1)
    return PretrainSequenceView(**{**args, **kwargs})


# ------------------------------------------------------------------------------------------- golden
VIDEO = [300, 306, 302, 301, 307, 309, 312, 308,   # clip at 12: [IMG] kf 4 0 [/IMG] [MOV] m 0 3 [/MOV]
         300, 303, 301, 307, 311, 311, 308]        # clip at 36: [IMG] kf 1 [/IMG] [MOV] m 2 2 [/MOV]
VIDEO_MOTION_ONLY = [307, 309, 312, 308, 307, 311, 311, 308]
T, K, M, S = 0, 1, 2, 3  # Modality values


@pytest.mark.parametrize("visual_first", [True, False])
@pytest.mark.parametrize("keyframes", ["dump", "none"])
def test_a_video_text_pair_has_the_exact_id_layout(tokenizer_dir, tmp_path, visual_first, keyframes):
    view = dump_view(tokenizer_dir, golden_dump(tmp_path), keyframe_source=keyframes,
                     visual_first_prob=1.0 if visual_first else 0.0)
    rows = list(view([raw_sample("vid_a")], train=False))
    assert len(rows) == 1
    row = rows[0]
    text = view.tokenizer(CAPTION, add_special_tokens=False)["input_ids"]
    assert text and max(text) < TINY.text_size
    video = VIDEO if keyframes == "dump" else VIDEO_MOTION_ONLY
    ids = [BOS_ID, *video, *text, EOS_ID] if visual_first else [BOS_ID, *text, *video, EOS_ID]
    n = len(ids)
    assert row.input_ids[:n].tolist() == ids
    assert row.labels[:n].tolist() == [X, *ids[1:]]  # every token but bos is a target
    assert row.input_ids[n:].tolist() == [view.tokenizer.pad_token_id] * (L - n)
    assert row.labels[n:].tolist() == [X] * (L - n)
    assert row.position_ids.tolist() == list(range(n)) + list(range(L - n))
    assert row.document_ids.tolist() == [0] * n + [PAD_DOCUMENT_ID] * (L - n)

    batch = view.collate(rows)
    video_modality = ([S, K, K, S, S, M, M, S, S, K, S, S, M, M, S] if keyframes == "dump"
                      else [S, M, M, S, S, M, M, S])
    text_modality = [T] * len(text)
    expected = [T, *video_modality, *text_modality, T] if visual_first else [T, *text_modality, *video_modality, T]
    assert batch["modality"][0, :n].tolist() == expected
    assert set(batch) >= {"input_ids", "labels", "position_ids", "document_ids", "modality", "cu_seqlens",
                          "max_seqlen"}
    assert batch["cu_seqlens"].tolist() == [0, n, L]


def test_target_only_supervision_leaves_the_first_segment_unlabelled(tokenizer_dir, tmp_path):
    view = dump_view(tokenizer_dir, golden_dump(tmp_path), visual_first_prob=1.0, supervise="target")
    row = next(iter(view([raw_sample("vid_a")])))
    text = view.tokenizer(CAPTION, add_special_tokens=False)["input_ids"]
    n = 1 + len(VIDEO) + len(text) + 1
    assert row.labels[:n].tolist() == [X] * (1 + len(VIDEO)) + text + [EOS_ID]


# ------------------------------------------------------------------------------------------- dumps, skips
def test_a_clip_missing_from_the_dump_skips_its_video_only(tokenizer_dir, tmp_path):
    write_dump(tmp_path, "motion", {("vid_a", 12): [0, 1], ("vid_a", 36): [1, 1], ("vid_b", 12): [2, 2]},
               TINY.motion_codes)  # vid_b's clip at 36 is missing
    view = dump_view(tokenizer_dir, tmp_path, keyframe_source="none", visual_first_prob=1.0)
    SKIPS.start_stream()
    rows = list(view([raw_sample("vid_b"), raw_sample("vid_a")]))
    assert SKIPS.counts == Counter({MISSING_TOKENS: 1})
    assert sum(r.num_documents for r in rows) == 1
    assert rows[0].input_ids[1:5].tolist() == [307, 309, 310, 308]  # vid_a's first clip


def test_a_dump_with_another_codebook_size_is_refused(tokenizer_dir, tmp_path):
    write_dump(tmp_path, "motion", {("vid_a", 12): [0], ("vid_a", 36): [1]}, num_codes=1024)
    view = dump_view(tokenizer_dir, tmp_path, keyframe_source="none")
    with pytest.raises(ValueError, match="1024 codes"):
        list(view([raw_sample("vid_a")]))


@pytest.mark.parametrize("kwargs, message", [
    (dict(motion_source="tokenizer"), "needs motion_tokenizer_export"),
    (dict(keyframe_source="tokenizer"), "keyframe_source='none'"),
    (dict(motion_source="dump", token_dump=None), "token_dump, which is not set"),
    (dict(keyframe_source="none", motion_source="tokenizer", motion_tokenizer_export="x"),
     "neither motion_source nor keyframe_source is 'dump'"),
    (dict(keyframe_source="none", motion_tokenizer_export="x"), "motion_source='dump' ignores it"),
    (dict(keyframe_source="random"), "keyframe_source must be"),
    (dict(weights={"video": 1.0}), "weights name the sources"),
    (dict(visual_first_prob=1.5), "visual_first_prob"),
])
def test_ambiguous_or_incomplete_sources_are_refused(tokenizer_dir, tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        dump_view(tokenizer_dir, tmp_path, **kwargs)


# ------------------------------------------------------------------------------------------- orders, mixing
def many_samples(n: int) -> tuple[list[dict], dict]:
    """``n`` samples and their motion ids (2 clips each)."""
    keys = [f"v{i:03d}" for i in range(n)]
    motion = {(k, s): [i % 4, (i + 1) % 4] for i, k in enumerate(keys) for s in (12, 36)}
    return [raw_sample(k) for k in keys], motion


def test_pair_order_follows_the_probability_and_validation_order_follows_the_key(tokenizer_dir, tmp_path):
    samples, motion = many_samples(200)
    write_dump(tmp_path, "motion", motion, TINY.motion_codes)
    view = dump_view(tokenizer_dir, tmp_path, keyframe_source="none", visual_first_prob=0.3)
    docs = list(view.documents(samples, train=True, rng=random.Random(5)))
    first = [doc.input_ids[1] == TINY.motion_start_id for doc in docs]
    assert len(docs) == 200 and 0.2 < sum(first) / 200 < 0.4
    again = [d.input_ids for d in view.documents(samples, train=True, rng=random.Random(5))]
    other = [d.input_ids for d in view.documents(samples, train=True, rng=random.Random(6))]
    assert again == [d.input_ids for d in docs] and other != again  # seeded

    val = [d.input_ids for d in view.documents(samples, train=False, rng=random.Random(1))]
    reordered = view.documents(list(reversed(samples)), train=False, rng=random.Random(2))
    assert sorted(d.input_ids for d in reordered) == sorted(val)  # the order is the key's, not the stream's


def test_text_documents_are_mixed_in_by_weight_and_read_once_for_validation(tokenizer_dir, tmp_path):
    samples, motion = many_samples(100)
    write_dump(tmp_path, "motion", motion, TINY.motion_codes)
    lines = [f"the {c} square moves {d}" for c in ("red", "blue", "green", "grey") for d in ("up", "down", "left")]
    corpus = tmp_path / "text.txt"
    corpus.write_text("\n".join(lines[:6]) + "\n\n" + "\n".join(lines[6:]) + "\n")  # blank lines are skipped
    view = dump_view(tokenizer_dir, tmp_path, keyframe_source="none", text_corpus=str(corpus),
                     val_text_corpus=str(corpus), weights={"video_text": 1.0, "text": 1.0}, text_shuffle_buffer=4)

    def is_text(doc):
        return all(i < TINY.text_size for i in doc.input_ids)

    train = list(view.documents(samples, train=True, rng=random.Random(0)))
    texts = [d for d in train if is_text(d)]
    assert 70 < len(texts) < 130 and len(train) - len(texts) == 100  # stops when the videos end
    decoded = {view.tokenizer.decode(d.input_ids[1:-1]) for d in texts}
    assert decoded == set(lines)  # the corpus cycles
    assert all(d.input_ids[0] == BOS_ID and d.input_ids[-1] == EOS_ID and d.labels == [X, *d.input_ids[1:]]
               for d in texts)

    val = list(view.documents(samples, train=False, rng=random.Random(0)))
    val_texts = sorted(view.tokenizer.decode(d.input_ids[1:-1]) for d in val if is_text(d))
    assert val_texts == sorted(lines) and len(val) == 100 + len(lines)  # everything exactly once


# ------------------------------------------------------------------------------------------- frozen tokenizers
@pytest.fixture(scope="module")
def tokenizer_exports(tmp_path_factory) -> tuple[Path, Vocabulary]:
    from videolavit.models.eva_vit import EvaViTConfig
    from videolavit.models.export import save_export
    from videolavit.models.keyframe_tokenizer import KeyframeTokenizer, KeyframeTokenizerConfig
    from videolavit.models.keyframe_tokenizer_export import init_backbone, save_keyframe_tokenizer
    from videolavit.models.motion_tokenizer import MotionTokenizer, MotionTokenizerConfig

    out = tmp_path_factory.mktemp("exports")
    torch.manual_seed(0)
    motion = MotionTokenizerConfig(num_frames=24, height=8, width=8, dim=32, num_heads=2, mlp_ratio=2.0,
                                   blocks_per_stage=[1, 1, 1, 1], downsample="conv", num_codes=32, code_dim=8,
                                   stage_factors=[[1, 2, 2], [2, 2, 2], [3, 1, 1], [1, 1, 1]])
    save_export(MotionTokenizer(motion), out, "motion_tokenizer", motion)
    keyframe = KeyframeTokenizerConfig(
        vit=EvaViTConfig(image_size=56, patch_size=14, width=32, depth=1, num_heads=2, mlp_dim=64, embed_dim=32),
        merger_depth=1, merger_heads=2, merger_mlp_dim=64, num_codes=16, code_dim=8, llm_dim=32)
    model = KeyframeTokenizer(keyframe)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        save_keyframe_tokenizer(model, out, init_backbone(model, None, 0))
    return out, Vocabulary(text_size=TINY.text_size, visual_codes=16, motion_codes=32)


def tokenizer_view(tokenizer_dir, exports, vocab, **kwargs) -> PretrainSequenceView:
    return PretrainSequenceView(tokenizer_path=str(tokenizer_dir), vocabulary=vocab, seq_len=128,
                                motion_tokenizer_export=str(exports), keyframe_tokenizer_export=str(exports),
                                visual_first_prob=1.0, **kwargs)


def test_codes_from_the_frozen_tokenizers_are_theirs(tokenizer_dir, tokenizer_exports, prepared_shards):
    from videolavit.models.export import load_export
    from videolavit.models.keyframe_tokenizer_export import load_keyframe_tokenizer

    exports, vocab = tokenizer_exports
    view = tokenizer_view(tokenizer_dir, exports, vocab, cache_videos=4)
    motion_model = load_export(exports, "motion_tokenizer").eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        keyframe_model = load_keyframe_tokenizer(exports)
    raw = next(iter_tar_samples(resolve_shards(str(prepared_shards))[0]))
    sample = decode_sample(raw)
    starts = view.clip_starts(sample, False, random.Random(0))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        keyframes, motions = view.video_codes(sample, starts)
        assert view.video_codes(sample, starts) == (keyframes, motions)  # cached

    with torch.inference_mode():
        fields = torch.stack([clip_motion(sample["motion"], s, (8, 8), 24, TOKENIZER_SCALE) for s in starts])
        assert motions == motion_model.encode(fields).tolist()
        # the synthetic videos are square, so the centre crop is the whole frame
        frames = decode_keyframes(sample["mp4"], starts, sample["meta"]["fps"], size=(56, 56))
        images = torch.from_numpy(frames).permute(0, 3, 1, 2).float() / 255
        ids, lengths = keyframe_model.tokenize(images)
    assert keyframes == [row[:n].tolist() for row, n in zip(ids, lengths.tolist())]
    assert all(len(m) == 16 for m in motions)  # 24x8x8 -> 4x2x2 tokens

    doc = view.pair_document(view.video_ids(keyframes, motions), sample["caption"], visual_first=True)
    assert doc.input_ids[1] == vocab.image_start_id
    assert doc.input_ids[2:2 + len(keyframes[0])] == [vocab.visual_offset + c for c in keyframes[0]]


def rows_documents(batches: list[dict]) -> list[tuple[int, ...]]:
    """Every document (its ids) of packed batches, in any order."""
    docs = []
    for batch in batches:
        for ids, documents in zip(batch["input_ids"], batch["document_ids"]):
            for d in documents.unique().tolist():
                if d != PAD_DOCUMENT_ID:
                    docs.append(tuple(ids[documents == d].tolist()))
    return sorted(docs)


def test_validation_reads_every_video_once_whatever_the_workers(tokenizer_dir, tokenizer_exports, prepared_shards,
                                                               tmp_path):
    exports, vocab = tokenizer_exports
    corpus = tmp_path / "val.txt"
    corpus.write_text("".join(f"line number {i}\n" for i in range(10)))
    found = []
    for workers in (0, 2):
        view = tokenizer_view(tokenizer_dir, exports, vocab, val_text_corpus=str(corpus),
                              weights={"video_text": 1.0, "text": 0.5})
        dm = VideoDataModule(val_shards=str(prepared_shards), view=view, batch_size=3, num_workers=workers)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            batches = list(dm.val_dataloader())
        assert all(b["input_ids"].shape[1] == 128 and b["modality"].shape == b["input_ids"].shape for b in batches)
        found.append(rows_documents(batches))
    assert found[0] == found[1]
    videos = [d for d in found[0] if vocab.image_start_id in d]
    assert len(videos) == 8 and len(found[0]) == 8 + 10  # 8 videos and 10 text lines, once each
    assert all(d.count(vocab.image_start_id) == 2 and d.count(vocab.motion_start_id) == 2 for d in videos)


def test_a_reader_whose_share_of_the_text_corpus_is_empty_draws_from_the_whole_file(tokenizer_dir, tmp_path,
                                                                                   monkeypatch):
    samples, motion = many_samples(20)
    write_dump(tmp_path, "motion", motion, TINY.motion_codes)
    corpus = tmp_path / "one_line.txt"
    corpus.write_text("the only line\n")
    monkeypatch.setenv("RANK", "1")  # rank 1 of 2: line 0 belongs to rank 0
    monkeypatch.setenv("WORLD_SIZE", "2")
    view = dump_view(tokenizer_dir, tmp_path, keyframe_source="none", text_corpus=str(corpus), text_shuffle_buffer=1)
    docs = list(view.documents(samples, train=True, rng=random.Random(0)))
    texts = {view.tokenizer.decode(d.input_ids[1:-1]) for d in docs if all(i < TINY.text_size for i in d.input_ids)}
    assert texts == {"the only line"} and len(docs) > 20


def test_image_text_pairs_become_one_keyframe_documents_and_bad_images_are_counted(
        tokenizer_dir, tokenizer_exports, tmp_path):
    from PIL import Image

    exports, vocab = tokenizer_exports
    for name, colour in (("red.png", (220, 30, 30)), ("blue.png", (30, 70, 230))):
        Image.new("RGB", (80, 60), colour).save(tmp_path / name)
    (tmp_path / "broken.png").write_bytes(b"not an image")
    records = [{"image": "red.png", "caption": "a red card"}, {"image": "broken.png", "caption": "x"},
               {"image": "blue.png", "caption": "a blue card"}]
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps(r) + "\n" for r in records))
    view = tokenizer_view(tokenizer_dir, exports, vocab, val_image_text=str(pairs),
                          weights={"video_text": 0.0, "image_text": 1.0})
    SKIPS.start_stream()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        docs = list(view.documents([], train=False, rng=random.Random(0)))
    assert len(docs) == 2 and SKIPS.counts == Counter({"unreadable_image": 1})
    tok = view.tokenizer
    for doc, caption in zip(docs, ("a red card", "a blue card")):
        ids = doc.input_ids
        assert ids[0] == tok.bos_token_id and ids[1] == vocab.image_start_id  # visual_first_prob=1.0
        end = ids.index(vocab.image_end_id)
        assert all(i in vocab.visual_range for i in ids[2:end]) and end > 2
        assert vocab.motion_start_id not in ids
        assert ids[end + 1:-1] == tok(caption, add_special_tokens=False)["input_ids"]
    with pytest.raises(ValueError, match="image_text"):
        PretrainSequenceView(tokenizer_path=str(tokenizer_dir), vocabulary=vocab, motion_tokenizer_export=str(exports),
                             keyframe_source="none", image_text=str(pairs), weights={"image_text": 1.0})
