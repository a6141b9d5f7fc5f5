"""Stage-2 token view: golden id layout of video-text pairs (both orders, with and without keyframes), the ids the
tokenize job wrote reach the rows, bad token samples are counted skips and other tokenizers' shards a named error,
text-only and image-text mixing, packing, a deterministic validation stream (whatever the number of workers), and
2 ranks x 2 workers reading disjoint shares."""

from __future__ import annotations

import csv
import dataclasses
import inspect
import json
import random
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from datamodules.instruct_views import InstructionSequenceView
from datamodules.llm_views import MISSING_TOKENS, PretrainSequenceView
from datamodules.shard_list import resolve_shards
from datamodules.skip_tracker import SKIPS
from datamodules.tar_reader import iter_tar_samples
from datamodules.token_source import TokenSource
from datamodules.tokenize_shards import TokenizeConfig, run_tokenize
from datamodules.video_datamodule import VideoDataModule
from tests.tiny_tokenizers import build_tokenizer_exports
from videolavit.llm.sequences import IGNORE_INDEX, PAD_DOCUMENT_ID
from videolavit.llm.text_tokenizer import BOS_ID, EOS_ID, build_tiny_tokenizer
from videolavit.llm.token_shards import TokenizerMismatchError, encode_token_sample
from videolavit.llm.vocabulary import Vocabulary

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


def token_raw(key: str, keyframes: dict[int, list[int]] | None, motions: dict[int, list[int]],
              caption: str = CAPTION, num_frames: int = 60, vocab: Vocabulary = TINY, fingerprint: str = "f0") -> dict:
    """A token sample as the tokenize job writes it (clips at 12 and 36 are what the views select)."""
    meta = {"source_id": key, "width": 96, "height": 96, "fps": 6, "num_frames": num_frames,
            "iframes": list(range(0, num_frames, 12))}
    starts = sorted(motions)
    return encode_token_sample(key, caption, meta, starts, np.array([motions[s] for s in starts]),
                               [np.array(keyframes[s]) for s in starts] if keyframes is not None else None,
                               fingerprint, vocab.motion_codes, vocab.visual_codes)


def golden(key: str = "vid_a") -> dict:
    return token_raw(key, {12: [4, 0], 36: [1]}, {12: [0, 3], 36: [2, 2]})


TOKEN_SOURCE_FIELDS = {f.name for f in dataclasses.fields(TokenSource)}


def sequence_view(**kwargs) -> PretrainSequenceView:
    """The view from flat keyword arguments: ``TokenSource`` fields go to ``tokens``, the rest to the view."""
    tokens = TokenSource(**{k: v for k, v in kwargs.items() if k in TOKEN_SOURCE_FIELDS})
    return PretrainSequenceView(tokens, **{k: v for k, v in kwargs.items() if k not in TOKEN_SOURCE_FIELDS})


def tokens_view(tokenizer_dir, **kwargs) -> PretrainSequenceView:
    args = dict(tokenizer_path=str(tokenizer_dir), vocabulary=TINY, seq_len=L, open_rows=1)
    return sequence_view(**{**args, **kwargs})


# ------------------------------------------------------------------------------------------- golden
VIDEO = [300, 306, 302, 301, 307, 309, 312, 308,   # clip at 12: [IMG] kf 4 0 [/IMG] [MOV] m 0 3 [/MOV]
         300, 303, 301, 307, 311, 311, 308]        # clip at 36: [IMG] kf 1 [/IMG] [MOV] m 2 2 [/MOV]
VIDEO_MOTION_ONLY = [307, 309, 312, 308, 307, 311, 311, 308]
T, K, M, S = 0, 1, 2, 3  # Modality values


@pytest.mark.parametrize("visual_first", [True, False])
@pytest.mark.parametrize("keyframes", ["tokens", "none"])
def test_a_video_text_pair_has_the_exact_id_layout(tokenizer_dir, tmp_path, visual_first, keyframes):
    view = tokens_view(tokenizer_dir, keyframe_source=keyframes, visual_first_prob=1.0 if visual_first else 0.0)
    rows = list(view([golden()], train=False))
    assert len(rows) == 1
    row = rows[0]
    text = view.tokenizer(CAPTION, add_special_tokens=False)["input_ids"]
    assert text and max(text) < TINY.text_size
    video = VIDEO if keyframes == "tokens" else VIDEO_MOTION_ONLY
    ids = [BOS_ID, *video, *text, EOS_ID] if visual_first else [BOS_ID, *text, *video, EOS_ID]
    n = len(ids)
    assert row.input_ids[:n].tolist() == ids
    assert row.labels[:n].tolist() == [X, *ids[1:]]  # every token but bos is a target
    assert row.input_ids[n:].tolist() == [view.tokenizer.pad_token_id] * (L - n)
    assert row.labels[n:].tolist() == [X] * (L - n)
    assert row.position_ids.tolist() == list(range(n)) + list(range(L - n))
    assert row.document_ids.tolist() == [0] * n + [PAD_DOCUMENT_ID] * (L - n)

    batch = view.collate(rows)
    video_modality = ([S, K, K, S, S, M, M, S, S, K, S, S, M, M, S] if keyframes == "tokens"
                      else [S, M, M, S, S, M, M, S])
    text_modality = [T] * len(text)
    expected = [T, *video_modality, *text_modality, T] if visual_first else [T, *text_modality, *video_modality, T]
    assert batch["modality"][0, :n].tolist() == expected
    assert set(batch) >= {"input_ids", "labels", "position_ids", "document_ids", "modality", "cu_seqlens",
                          "max_seqlen"}
    assert batch["cu_seqlens"].tolist() == [0, n, L]


def test_target_only_supervision_leaves_the_first_segment_unlabelled(tokenizer_dir, tmp_path):
    view = tokens_view(tokenizer_dir, visual_first_prob=1.0, supervise="target")
    row = next(iter(view([golden()])))
    text = view.tokenizer(CAPTION, add_special_tokens=False)["input_ids"]
    n = 1 + len(VIDEO) + len(text) + 1
    assert row.labels[:n].tolist() == [X] * (1 + len(VIDEO)) + text + [EOS_ID]


# ------------------------------------------------------------------------------------------- bad token samples
def test_a_clip_missing_from_the_token_sample_skips_its_video_only(tokenizer_dir):
    view = tokens_view(tokenizer_dir, keyframe_source="none", visual_first_prob=1.0)
    SKIPS.start_stream()
    rows = list(view([token_raw("vid_b", None, {12: [2, 2]}), token_raw("vid_a", None, {12: [0, 1], 36: [1, 1]})]))
    assert SKIPS.counts == Counter({MISSING_TOKENS: 1})
    assert sum(r.num_documents for r in rows) == 1
    assert rows[0].input_ids[1:5].tolist() == [307, 309, 310, 308]  # vid_a's first clip


def test_bad_token_samples_are_counted_skips_and_the_good_ones_all_arrive(tokenizer_dir):
    corrupt = golden("corrupt")
    corrupt["ids.npy"] = corrupt["ids.npy"][:20]  # a cut member
    high = token_raw("high", {12: [4, 0], 36: [1]}, {12: [0, 4], 36: [2, 2]})  # motion code 4 of 4 codes
    no_motion = golden("no_motion")
    del no_motion["ids.npy"]
    empty_clip = golden("empty_clip")  # the writer refuses clips without motion ids: a hand-made record
    record = json.loads(empty_clip["json"])
    empty_clip["json"] = json.dumps({**record, "motion_tokens": 0}).encode()
    no_keyframes = token_raw("no_keyframe", {12: [4, 0, 1], 36: []}, {12: [0, 3], 36: [2, 2]})
    bad_json = {**golden("bad_json"), "json": b"{"}
    view = tokens_view(tokenizer_dir, visual_first_prob=1.0, seq_len=256)
    SKIPS.start_stream()
    docs = list(view.documents([corrupt, golden("a"), high, no_motion, empty_clip, no_keyframes, bad_json,
                                golden("b")], train=False, rng=random.Random(0)))
    assert SKIPS.counts == Counter({"corrupt_sample": 2, "ids_out_of_range": 1, "missing_motion_ids": 2,
                                    "missing_keyframe_ids": 1})
    assert len(docs) == 2 and all(d.input_ids[1:1 + len(VIDEO)] == VIDEO for d in docs)


def test_token_shards_of_other_tokenizers_are_a_named_error(tokenizer_dir, tmp_path):
    other = token_raw("vid_a", None, {12: [0], 36: [1]}, vocab=Vocabulary(text_size=300, visual_codes=5,
                                                                      motion_codes=1024))
    with pytest.raises(TokenizerMismatchError, match="1024 motion"):
        list(tokens_view(tokenizer_dir, keyframe_source="none")([other]))
    exports = build_tokenizer_exports(tmp_path / "exports")
    vocab = Vocabulary(text_size=TINY.text_size, visual_codes=16, motion_codes=32)
    stranger = token_raw("vid_a", {12: [1], 36: [2]}, {12: [0], 36: [1]}, vocab=vocab, fingerprint="elsewhere")
    view = tokens_view(tokenizer_dir, vocabulary=vocab, tokenizer_exports=str(exports))
    with pytest.raises(TokenizerMismatchError, match="tokenizer_exports"):
        list(view([stranger]))
    motion_only = token_raw("vid_a", None, {12: [0], 36: [1]}, vocab=vocab)
    with pytest.raises(TokenizerMismatchError, match="keyframe_source: none"):
        list(tokens_view(tokenizer_dir, vocabulary=vocab)([motion_only]))


@pytest.mark.parametrize("kwargs, message", [
    (dict(keyframe_source="tokenizer"), "keyframe_source must be"),
    (dict(weights={"video": 1.0}), "weights name the sources"),
    (dict(visual_first_prob=1.5), "visual_first_prob"),
    (dict(image_text="pairs.jsonl", weights={"image_text": 1.0}), "image_tokenizer_export"),
])
def test_bad_settings_are_refused(tokenizer_dir, kwargs, message):
    with pytest.raises(ValueError, match=message):
        tokens_view(tokenizer_dir, **kwargs)


@pytest.mark.parametrize("view_class", [PretrainSequenceView, InstructionSequenceView])
def test_the_llm_views_take_the_shared_arguments_as_one_token_source(view_class, tokenizer_dir):
    params = inspect.signature(view_class.__init__).parameters
    assert "tokens" in params and not set(params) & TOKEN_SOURCE_FIELDS  # declared once, in TokenSource
    tokens = TokenSource(tokenizer_path=str(tokenizer_dir), vocabulary=TINY, seq_len=L, keyframe_source="none",
                         tokenizer_exports="exports", open_rows=2, max_clips=3)
    extra = {"conversations": "qa.json"} if view_class is InstructionSequenceView else {}
    view = view_class(tokens, **extra)
    assert (view.seq_len, view.open_rows, view.max_clips, view.keyframe_source) == (L, 2, 3, "none")
    assert view.vocabulary == TINY and view.image_tokenizer_export == "exports"  # defaults to tokenizer_exports
    with pytest.raises(TypeError, match="tokens must be a TokenSource"):
        view_class({"tokenizer_path": str(tokenizer_dir)}, **extra)


# ------------------------------------------------------------------------------------------- orders, mixing
def many_samples(n: int) -> list[dict]:
    """``n`` motion-only token samples (2 clips each)."""
    return [token_raw(f"v{i:03d}", None, {s: [i % 4, (i + 1) % 4] for s in (12, 36)}) for i in range(n)]


def test_pair_order_follows_the_probability_and_validation_order_follows_the_key(tokenizer_dir, tmp_path):
    samples = many_samples(200)
    view = tokens_view(tokenizer_dir, keyframe_source="none", visual_first_prob=0.3)
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
    samples = many_samples(100)
    lines = [f"the {c} square moves {d}" for c in ("red", "blue", "green", "grey") for d in ("up", "down", "left")]
    corpus = tmp_path / "text.txt"
    corpus.write_text("\n".join(lines[:6]) + "\n\n" + "\n".join(lines[6:]) + "\n")  # blank lines are skipped
    view = tokens_view(tokenizer_dir, keyframe_source="none", text_corpus=str(corpus), val_text_corpus=str(corpus),
                       weights={"video_text": 1.0, "text": 1.0}, text_shuffle_buffer=4)

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


# ------------------------------------------------------------------------------------------- token shards
VOCAB = Vocabulary(text_size=TINY.text_size, visual_codes=16, motion_codes=32)


@pytest.fixture(scope="module")
def tokenizer_exports(tmp_path_factory) -> tuple[Path, Vocabulary]:
    return build_tokenizer_exports(tmp_path_factory.mktemp("exports")), VOCAB


@pytest.fixture(scope="module")
def token_shards(tokenizer_exports, prepared_shards, tmp_path_factory) -> Path:
    """The prepared corpus tokenised by the tokenize job (4 token shards of 2 videos)."""
    out = tmp_path_factory.mktemp("tokens")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run_tokenize(TokenizeConfig(shards=str(prepared_shards), exports=str(tokenizer_exports[0]), out=str(out),
                                    progress=False))
    return out


def tokenizer_view(tokenizer_dir, exports, vocab, **kwargs) -> PretrainSequenceView:
    return sequence_view(tokenizer_path=str(tokenizer_dir), vocabulary=vocab, seq_len=128,
                         tokenizer_exports=str(exports), visual_first_prob=1.0, **kwargs)


def test_the_view_reads_the_ids_the_tokenize_job_wrote(tokenizer_dir, tokenizer_exports, token_shards):
    from videolavit.llm.token_shards import decode_token_sample

    exports, vocab = tokenizer_exports
    view = tokenizer_view(tokenizer_dir, exports, vocab)
    raw = next(iter_tar_samples(resolve_shards(str(token_shards))[0], required=()))
    sample = decode_token_sample(raw, vocab)
    doc = next(view.video_documents([raw], train=False, rng=random.Random(0)))
    expected = []
    for keyframe, motion in zip(sample.keyframes, sample.motions):
        expected += [vocab.image_start_id, *(vocab.visual_offset + int(c) for c in keyframe), vocab.image_end_id,
                     vocab.motion_start_id, *(vocab.motion_offset + int(c) for c in motion), vocab.motion_end_id]
    assert doc.input_ids[1:1 + len(expected)] == expected and len(sample.motions) == 2
    assert view.tokenizer.decode(doc.input_ids[1 + len(expected):-1]) == sample.caption


def rows_documents(batches: list[dict]) -> list[tuple[int, ...]]:
    """Every document (its ids) of packed batches, in any order."""
    docs = []
    for batch in batches:
        for ids, documents in zip(batch["input_ids"], batch["document_ids"]):
            for d in documents.unique().tolist():
                if d != PAD_DOCUMENT_ID:
                    docs.append(tuple(ids[documents == d].tolist()))
    return sorted(docs)


def test_validation_reads_every_video_once_whatever_the_workers(tokenizer_dir, tokenizer_exports, token_shards,
                                                               tmp_path):
    exports, vocab = tokenizer_exports
    corpus = tmp_path / "val.txt"
    corpus.write_text("".join(f"line number {i}\n" for i in range(10)))
    found = []
    for workers in (0, 2):
        view = tokenizer_view(tokenizer_dir, exports, vocab, val_text_corpus=str(corpus),
                              weights={"video_text": 1.0, "text": 0.5})
        dm = VideoDataModule(val_shards=str(token_shards), view=view, batch_size=3, num_workers=workers)
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
    samples = many_samples(20)
    corpus = tmp_path / "one_line.txt"
    corpus.write_text("the only line\n")
    monkeypatch.setenv("RANK", "1")  # rank 1 of 2: line 0 belongs to rank 0
    monkeypatch.setenv("WORLD_SIZE", "2")
    view = tokens_view(tokenizer_dir, keyframe_source="none", text_corpus=str(corpus), text_shuffle_buffer=1)
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
        sequence_view(tokenizer_path=str(tokenizer_dir), vocabulary=vocab, keyframe_source="none",
                      image_text=str(pairs), weights={"image_text": 1.0})


# ------------------------------------------------------------------------------------------- ranks x workers
def numbered_token_shards(root: Path, shards: int = 8, per_shard: int = 3) -> Path:
    """Motion-only token shards whose video n has motion codes [n, n] in both clips (n < 32)."""
    import webdataset as wds

    root.mkdir(parents=True, exist_ok=True)
    for s in range(shards):
        with wds.TarWriter(str(root / f"tok-{s:03d}.tar")) as sink:
            for j in range(per_shard):
                n = s * per_shard + j
                sink.write(token_raw(f"v{n:03d}", None, {12: [n, n], 36: [n, n]}, caption=f"video {n}", vocab=VOCAB))
    names = [f"tok-{s:03d}.tar" for s in range(shards)]  # a finished job's manifest: the DataModule reads only it
    (root / "manifest.json").write_text(json.dumps({"complete": True, "shards": names,
                                                    "shard_samples": {n: per_shard for n in names}}))
    return root


def videos_in(batches: list[dict]) -> list[int]:
    """The number n of every video document in packed batches (its first motion code)."""
    found = []
    for batch in batches:
        for ids, documents in zip(batch["input_ids"], batch["document_ids"]):
            for d in documents.unique().tolist():
                doc = ids[documents == d].tolist()
                if d != PAD_DOCUMENT_ID and VOCAB.motion_start_id in doc:
                    found.append(doc[doc.index(VOCAB.motion_start_id) + 1] - VOCAB.motion_offset)
    return found


def test_two_ranks_of_two_workers_read_disjoint_shares_and_validation_sees_each_video_once(tokenizer_dir, tmp_path):
    shards = numbered_token_shards(tmp_path / "tokens")
    view = tokens_view(tokenizer_dir, vocabulary=VOCAB, keyframe_source="none", seq_len=64)
    seen = {}
    for rank in (0, 1):
        dm = VideoDataModule(val_shards=str(shards), view=view, batch_size=4, num_workers=2)
        dm.rank, dm.world_size = rank, 2
        seen[rank] = videos_in(list(dm.val_dataloader()))
    assert not set(seen[0]) & set(seen[1])
    assert sorted(seen[0] + seen[1]) == list(range(24))  # every video once, over both ranks and their workers

    streams = {}
    for rank in (0, 1):
        dm = VideoDataModule(train_shards=str(shards), view=view, batch_size=8, num_workers=2, samples_per_epoch=32,
                             shuffle_buffer=4)
        dm.rank, dm.world_size = rank, 2
        streams[rank] = videos_in(list(dm.train_dataloader()))
    assert streams[0] != streams[1] and all(set(s) <= set(range(24)) for s in streams.values())


def test_marker_text_in_captions_and_text_lines_stays_text(tokenizer_dir, tmp_path):
    # A data file that spells a marker ("[IMG]", "</s>") must not put that marker's id into the sequence: the
    # LLM would learn a keyframe block or an end of document where the data has words.
    hostile = "a red [IMG] circle </s> [MOV] moves <s>"
    specials = {*TINY.special_ids, BOS_ID, EOS_ID}
    corpus = tmp_path / "lines.txt"
    corpus.write_text(hostile + "\n")
    view = tokens_view(tokenizer_dir, keyframe_source="none", text_corpus=str(corpus), text_shuffle_buffer=1)
    docs = [d for d in view.documents(many_samples(4), train=True, rng=random.Random(0))
            if all(i < TINY.text_size for i in d.input_ids)]
    assert docs and all(specials.isdisjoint(d.input_ids[1:-1]) for d in docs)
    motion = [view.vocabulary.motion_start_id, view.vocabulary.motion_end_id]
    pair = view.pair_document(motion, hostile, visual_first=True).input_ids
    assert pair[:3] == [BOS_ID, *motion] and pair[-1] == EOS_ID  # the real markers only
    assert specials.isdisjoint(pair[3:-1])
