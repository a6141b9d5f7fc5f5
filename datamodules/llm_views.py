"""Token-sequence views for the LLM stages (DESIGN §3, §8): shard samples -> packed token rows.

``PretrainSequenceView`` (stage 2) turns the decoded shard stream into rows of exactly ``seq_len`` ids:

1. every video sample becomes one video-text *pair* document (``sequences.multimodal_pair``): its
   clips (``SampleView.clip_starts``: up to ``max_clips`` 24-frame clips starting at I-frames) as
   ``[IMG] keyframe codes [/IMG] [MOV] motion codes [/MOV]`` per clip, and its caption. The order -
   ``[video, caption]`` (understanding) or ``[caption, video]`` (generation) - is drawn per sample:
   ``visual_first_prob`` is the probability of ``[video, caption]``; training draws it from the
   stream's seeded RNG, validation from the sample key (so validation does not depend on how samples
   are split over ranks and workers);
2. text-only documents (``bos line eos``) come from a local text file, one document per line;
3. ``SourceMixer`` interleaves the two sources by ``weights`` (counted in *documents*, not tokens);
4. ``pack_documents`` packs them leak-free (position ids restart per document; no document is cut
   unless it is longer than ``seq_len``).

``VideoTokenView`` is the shared base of the LLM views (this one and stage 3's
``datamodules.instruct_views.InstructionSequenceView``): the text tokenizer, the id layout, the code
sources below, the codes cache and ``collate``.

Where the visual codes come from, motion (``motion_source``):

* ``"tokenizer"``: the frozen stage-1a tokenizer (``motion_tokenizer_export``, loaded with
  ``load_export(dir, "motion_tokenizer")``) runs inside the data pipeline on each clip's motion field
  (``clip_motion`` at the tokenizer's grid, ×10 tokenizer scale). Simple, and right for small runs; it
  costs data-worker CPU time per clip (``cache_videos`` keeps codes of videos read again).
* ``"dump"``: ``token_dump``, a directory written by ``callbacks.token_dump.TokenDumpWriter`` (``predict``
  of stage 1a), read with ``read_token_dump`` -> ``{(key, clip_start): motion ids}``; for large runs,
  tokenise once and read the ids back. A clip missing from the dump skips its video (reason
  ``missing_tokens``). Each process holds the whole dump in memory.

Keyframe codes (``keyframe_source``):

* ``"tokenizer"``: the frozen LaVIT keyframe tokenizer (``keyframe_tokenizer_export``, export name
  ``keyframe_tokenizer``, rebuilt by ``keyframe_tokenizer_export.load_keyframe_tokenizer``) tokenises
  each clip's keyframe, decoded from the stored mp4, resized and centre-cropped to the ViT's input size;
* ``"dump"``: ``read_token_dump(token_dump, "keyframe")`` (``TokenDumpWriter(name="keyframe")`` on the
  keyframe tokenizer stage's ``predict``; its -1 padding is dropped). The release-size ViT-g is far too
  heavy to run in CPU data workers, so full-scale runs dump keyframe ids first;
* ``"none"``: NO keyframe codes - each clip is ``[MOV] motion codes [/MOV]`` only. This is a reduced
  setting for runs without a trained keyframe tokenizer (e.g. the tiny CPU chain); the LLM then never
  sees ``[IMG]`` blocks. It is never chosen implicitly: the default is ``"tokenizer"``, which fails
  loudly without an export.

Batch keys (``collate``; ``B`` rows of ``L = seq_len`` tokens):

==================  ============================================================================
``input_ids``       long [B, L]; padding is the tokenizer's pad id (unk for Llama)
``labels``          long [B, L]; aligned with ``input_ids`` (the model shifts), -100 = no loss (padding,
                    each document's first token)
``position_ids``    long [B, L]; restart at 0 for every document and for the padding tail
``document_ids``    long [B, L]; 0.. per document within the row, -1 on padding
``modality``        long [B, L]; ``Vocabulary.modality_of(input_ids)`` (0 text, 1 keyframe, 2 motion,
                    3 block markers). Since ``labels[i]`` is ``input_ids[i]`` wherever it is a target,
                    this is also the modality of the target at position ``i`` (per-modality losses).
``cu_seqlens``      int32 [segments + 1] over the flattened batch; ``max_seqlen`` int (flash-attention)
==================  ============================================================================

Call the model with ``input_ids``, ``position_ids`` and ``use_cache=False`` only (see ``sequences``:
no 2-D attention mask, or documents leak into each other). Training is a shuffled stream (resampled
shards, shuffled text, rows shuffled by the DataModule); validation is deterministic: every sample
once, in shard order, each text line of ``val_text_corpus`` once.
"""

from __future__ import annotations

import os
import random
import zlib
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Literal

import torch

from datamodules.sample_format import decode_sample
from datamodules.skip_tracker import SKIPS, SKIPS_KEY
from datamodules.views import SampleView, _resize_crop_box, _to_chw
from videolavit.llm.sequences import (
    PackedRow,
    PackingStats,
    SourceMixer,
    TokenSequence,
    collate_packed_rows,
    image_token_ids,
    multimodal_pair,
    pack_documents,
    text_document,
    video_token_ids,
)
from videolavit.llm.text_tokenizer import load_text_tokenizer
from videolavit.llm.vocabulary import Vocabulary
from videolavit.video import errors
from videolavit.video.clips import CLIP_FRAMES, clip_motion
from videolavit.video.frames import decode_keyframes
from videolavit.video.motion_grid import TOKENIZER_SCALE

MISSING_TOKENS = "missing_tokens"  # skip reason: a clip of the video is not in the token dump

MOTION_EXPORT = "motion_tokenizer"
KEYFRAME_EXPORT = "keyframe_tokenizer"

MotionSource = Literal["tokenizer", "dump"]
KeyframeSource = Literal["tokenizer", "dump", "none"]


def _reader_slot() -> tuple[int, int]:
    """(index, count) of this reader among all ranks × DataLoader workers, to split a text file.

    The rank comes from ``torch.distributed`` (forked workers inherit it) or the ``RANK``/``WORLD_SIZE``
    environment; without either the process is alone.
    """
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    else:
        rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    info = torch.utils.data.get_worker_info()
    worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
    return rank * workers + worker, world * workers


def read_text_lines(path: str | Path, slot: int = 0, slots: int = 1) -> Iterator[str]:
    """Non-empty lines (stripped) of a UTF-8 text file, the ``slot``-th of every ``slots`` lines."""
    with open(path, encoding="utf-8") as handle:
        for index, line in enumerate(handle):
            if index % slots != slot:
                continue
            line = line.strip()
            if line:
                yield line


def captions_of_shards(shards: str | list[str]) -> Iterator[str]:
    """Every caption in the given shards (for building a tiny tokenizer)."""
    from datamodules.shard_list import resolve_shards
    from datamodules.tar_reader import iter_tar_samples

    for url in resolve_shards(shards):
        for raw in iter_tar_samples(url):
            if "txt" in raw:
                yield raw["txt"].decode("utf-8")


class VideoTokenView(SampleView):
    """Base of the LLM views: a video sample's clips -> LLM token ids with the frozen stage-1 tokenizers.

    Holds what every LLM stage shares: the text tokenizer, the id layout, where motion and keyframe codes
    come from (``motion_source`` / ``keyframe_source``, documented in the module docstring), the per-process
    codes cache and ``collate`` (the packed-row batch keys of the module docstring). Subclasses
    (``PretrainSequenceView``, ``datamodules.instruct_views.InstructionSequenceView``) turn the codes into
    documents. ``video_codes`` also serves inference (``videolavit.inference.video_chat``) on a sample
    built from a freshly decomposed video.

    Args:
        tokenizer_path: local directory of the text tokenizer (``load_text_tokenizer``; its size must be
            ``vocabulary.text_size``).
        vocabulary: the id layout (release layout by default); must be the stage's.
        seq_len: tokens per packed row (paper: 2048).
        motion_source: ``"tokenizer"`` (run ``motion_tokenizer_export`` on the clips) | ``"dump"`` (``token_dump``).
        motion_tokenizer_export: stage-1a export directory (the frozen motion tokenizer).
        token_dump: ``TokenDumpWriter`` directory (``motion_tokens.json`` and/or ``keyframe_tokens.json``).
        keyframe_source: ``"tokenizer"`` | ``"dump"`` | ``"none"`` (documented above; ``"none"`` drops keyframes).
        keyframe_tokenizer_export: directory with the ``keyframe_tokenizer`` export (``keyframe_source="tokenizer"``),
            loaded with ``load_keyframe_tokenizer`` (trained parts + the frozen ViT from its own file).
        keyframe_backbone_weights: local ViT weight file, overriding the path recorded in that export.
        open_rows: rows kept open while packing (1 = next-fit; more pads less).
        tokenizer_device: device the frozen tokenizers run on inside the data pipeline.
        cache_videos: keep the codes of up to this many videos per process (LRU) instead of running the
            frozen tokenizers again when a video comes back. For small corpora read many times (tiny runs);
            0 (default) for real corpora, which are read about once.
        clip_frames, max_clips, clips_per_video: which clips of a video (``SampleView``).
    """

    name = "video_tokens"

    def __init__(self, tokenizer_path: str, vocabulary: Vocabulary | None = None, seq_len: int = 2048,
                 motion_source: MotionSource = "tokenizer", motion_tokenizer_export: str | None = None,
                 token_dump: str | None = None, keyframe_source: KeyframeSource = "tokenizer",
                 keyframe_tokenizer_export: str | None = None, keyframe_backbone_weights: str | None = None,
                 open_rows: int = 4, tokenizer_device: str = "cpu", cache_videos: int = 0,
                 clip_frames: int = CLIP_FRAMES, max_clips: int = 8, clips_per_video: str = "all"):
        super().__init__(clip_frames=clip_frames, max_clips=max_clips, clips_per_video=clips_per_video)
        self.tokenizer_path = tokenizer_path
        self.vocabulary = vocabulary or Vocabulary.release()
        self.seq_len, self.open_rows = int(seq_len), int(open_rows)
        self.motion_source, self.motion_tokenizer_export = motion_source, motion_tokenizer_export
        self.token_dump = token_dump
        self.keyframe_source, self.keyframe_tokenizer_export = keyframe_source, keyframe_tokenizer_export
        self.keyframe_backbone_weights = keyframe_backbone_weights
        self.tokenizer_device = tokenizer_device
        self.cache_videos = int(cache_videos)
        self._codes_cache: OrderedDict[tuple, tuple] = OrderedDict()
        self.stats = PackingStats()  # of this process (workers keep their own)

        if motion_source not in ("tokenizer", "dump"):
            raise ValueError(f"motion_source must be 'tokenizer' or 'dump', got {motion_source!r}")
        if keyframe_source not in ("tokenizer", "dump", "none"):
            raise ValueError(f"keyframe_source must be 'tokenizer', 'dump' or 'none', got {keyframe_source!r}")
        for kind, source, export in (("motion", motion_source, motion_tokenizer_export),
                                     ("keyframe", keyframe_source, keyframe_tokenizer_export)):
            if source == "tokenizer" and export is None:
                hint = ", or keyframe_source='none' to train without keyframe codes" if kind == "keyframe" else ""
                raise ValueError(f"{kind}_source='tokenizer' needs {kind}_tokenizer_export; use {kind}_source="
                                 f"'dump' with token_dump{hint}")
            if source != "tokenizer" and export is not None:
                raise ValueError(f"{kind}_tokenizer_export is set but {kind}_source={source!r} ignores it")
        if "dump" in (motion_source, keyframe_source) and token_dump is None:
            raise ValueError("a 'dump' source reads ids from token_dump, which is not set")
        if token_dump is not None and "dump" not in (motion_source, keyframe_source):
            raise ValueError("token_dump is set but neither motion_source nor keyframe_source is 'dump'")
        # The stored video is decoded only to tokenise keyframes.
        self.need_video = keyframe_source == "tokenizer"
        self._tokenizer = None
        self._motion = None
        self._keyframe: dict[str, torch.nn.Module] = {}  # by export directory
        self._dumps: dict[str, dict] = {}

    # ---- lazily loaded per process (DataLoader workers load their own) ----------------------------
    @property
    def tokenizer(self):
        if self._tokenizer is None:
            self._tokenizer = load_text_tokenizer(self.tokenizer_path, self.vocabulary)
        return self._tokenizer

    def _motion_tokenizer(self):
        if self._motion is None:
            from videolavit.models.export import load_export

            model = load_export(self.motion_tokenizer_export, MOTION_EXPORT, map_location=self.tokenizer_device)
            config = model.config
            if config.num_codes != self.vocabulary.motion_codes:
                raise ValueError(f"the motion tokenizer in {self.motion_tokenizer_export} has {config.num_codes} "
                                 f"codes but the vocabulary has motion_codes={self.vocabulary.motion_codes}")
            if config.num_frames != self.clip_frames:
                raise ValueError(f"the motion tokenizer reads {config.num_frames}-frame clips, the view cuts "
                                 f"{self.clip_frames}")
            self._motion = model.eval().requires_grad_(False)
        return self._motion

    def _keyframe_tokenizer(self, export: str | None = None):
        """The frozen keyframe tokenizer of ``export`` (default ``keyframe_tokenizer_export``), loaded once."""
        export = export or self.keyframe_tokenizer_export
        if export is None:
            raise ValueError("no keyframe tokenizer export is set")
        if export not in self._keyframe:
            from videolavit.models.keyframe_tokenizer_export import load_keyframe_tokenizer

            model = load_keyframe_tokenizer(export, self.keyframe_backbone_weights,
                                            name=KEYFRAME_EXPORT, map_location=self.tokenizer_device)
            if model.config.num_codes != self.vocabulary.visual_codes:
                raise ValueError(f"the keyframe tokenizer in {export} has "
                                 f"{model.config.num_codes} codes but the vocabulary has visual_codes="
                                 f"{self.vocabulary.visual_codes}")
            self._keyframe[export] = model.eval().requires_grad_(False)
        return self._keyframe[export]

    def _dump(self, name: str) -> dict:
        if name not in self._dumps:
            from callbacks.token_dump import read_token_dump, read_token_manifest

            codes = self.vocabulary.motion_codes if name == "motion" else self.vocabulary.visual_codes
            found = read_token_manifest(self.token_dump, name).get("num_codes")
            if found is not None and found != codes:
                raise ValueError(f"the {name} token dump in {self.token_dump} has {found} codes but the "
                                 f"vocabulary has {codes}")
            self._dumps[name] = read_token_dump(self.token_dump, name)
        return self._dumps[name]

    # ---- codes of one video ---------------------------------------------------------------------
    @torch.inference_mode()
    def motion_codes(self, sample: dict, starts: list[int]) -> list[list[int]]:
        """Motion code ids (in [0, motion_codes)) of each clip, from the tokenizer or the dump."""
        if self.motion_source == "dump":
            dump = self._dump("motion")
            missing = [s for s in starts if (sample["key"], s) not in dump]
            if missing:
                raise errors.VideoSkip(MISSING_TOKENS, f"{sample['key']}: clips {missing} not in {self.token_dump}")
            return [list(dump[(sample["key"], s)]) for s in starts]
        model = self._motion_tokenizer()
        grid = (model.config.height, model.config.width)
        motion = torch.stack([clip_motion(sample["motion"], s, grid, self.clip_frames, TOKENIZER_SCALE)
                              for s in starts])
        return model.encode(motion.to(self.tokenizer_device)).cpu().tolist()

    @torch.inference_mode()
    def image_codes(self, images: torch.Tensor, export: str | None = None) -> list[list[int]]:
        """Keyframe code ids (variable length) of float images [N, 3, S, S] in [0, 1] at the ViT's size, from
        the frozen keyframe tokenizer of ``export`` (default: ``keyframe_tokenizer_export``)."""
        model = self._keyframe_tokenizer(export)
        ids, lengths = model.tokenize(images.to(self.tokenizer_device))
        return [row[:n].tolist() for row, n in zip(ids.cpu(), lengths.cpu().tolist())]

    def keyframe_image_size(self, export: str | None = None) -> int:
        """Side of the square images the keyframe tokenizer reads (its ViT's input size)."""
        return self._keyframe_tokenizer(export).config.vit.image_size

    @torch.inference_mode()
    def keyframe_codes(self, sample: dict, starts: list[int]) -> list[list[int]] | None:
        """Keyframe code ids of each clip (variable length), or None with ``keyframe_source="none"``."""
        if self.keyframe_source == "none":
            return None
        if self.keyframe_source == "dump":
            dump = self._dump("keyframe")
            missing = [s for s in starts if (sample["key"], s) not in dump]
            if missing:
                raise errors.VideoSkip(MISSING_TOKENS, f"{sample['key']}: keyframes {missing} not in {self.token_dump}")
            # keyframe dumps hold the padded ids of KeyframeTokenizerStage.predict_step (-1 = padding)
            return [[i for i in dump[(sample["key"], s)] if i >= 0] for s in starts]
        meta = sample["meta"]
        size = self.keyframe_image_size()
        (rh, rw), (ys, xs) = _resize_crop_box(meta["height"], meta["width"], (size, size))
        frames = decode_keyframes(sample["mp4"], starts, meta["fps"], size=(rh, rw))[:, ys, xs]
        return self.image_codes(_to_chw(frames).float().div(255.0))

    def video_codes(self, sample: dict, starts: list[int]) -> tuple[list[list[int]] | None, list[list[int]]]:
        """(keyframe codes or None, motion codes) of the clips at ``starts``; cached with ``cache_videos``."""
        if self.cache_videos <= 0:
            return self.keyframe_codes(sample, starts), self.motion_codes(sample, starts)
        key = (sample["key"], tuple(starts))
        if key in self._codes_cache:
            self._codes_cache.move_to_end(key)
            return self._codes_cache[key]
        codes = self.keyframe_codes(sample, starts), self.motion_codes(sample, starts)
        self._codes_cache[key] = codes
        if len(self._codes_cache) > self.cache_videos:
            self._codes_cache.popitem(last=False)
        return codes

    def video_ids(self, keyframes: list[list[int]] | None, motions: list[list[int]]) -> list[int]:
        """Vocabulary ids of a video: per clip ``[IMG] kf [/IMG] [MOV] motion [/MOV]`` (or motion only)."""
        if keyframes is not None:
            return video_token_ids(keyframes, motions, self.vocabulary)
        vocab = self.vocabulary
        return [i for clip in motions for i in (vocab.motion_start_id, *vocab.motion_id(list(clip)),
                                                vocab.motion_end_id)]

    def collate(self, examples: list[PackedRow]) -> dict:
        batch = collate_packed_rows(examples)
        batch["modality"] = self.vocabulary.modality_of(batch["input_ids"])
        SKIPS.delivered()
        batch[SKIPS_KEY] = SKIPS.snapshot()
        return batch


class PretrainSequenceView(VideoTokenView):
    """Packed video-text + text-only token rows for stage 2 (see the module docstring for batch keys).

    Args (besides ``VideoTokenView``'s: tokenizer, vocabulary, seq_len, code sources, open_rows, cache, clips):
        text_corpus: local text file of text-only training documents, one per line (None: none).
        val_text_corpus: same for validation (None: validation has video-text pairs only).
        image_text: local JSONL of image-text pairs, one ``{"image": path, "caption": str}`` per line (paths
            relative to the file's directory; e.g. CC3M/LAION fetched beforehand): each becomes
            ``[IMG] keyframe codes [/IMG]`` + caption in either order, like a one-keyframe video. Needs a
            keyframe tokenizer export (``keyframe_tokenizer_export``). Unreadable images are counted skips.
        val_image_text: same for validation.
        weights: mixing weights per source, ``video_text``, ``image_text`` and ``text``, in documents.
        visual_first_prob: probability of the ``[video, caption]`` order (else ``[caption, video]``).
        supervise: ``"all"`` (every token of a pair is a target; paper) or ``"target"`` (second segment only).
        text_shuffle_buffer: text lines held for shuffling in training.
    """

    name = "pretrain_sequence"

    def __init__(self, tokenizer_path: str, vocabulary: Vocabulary | None = None, seq_len: int = 2048,
                 motion_source: MotionSource = "tokenizer", motion_tokenizer_export: str | None = None,
                 token_dump: str | None = None, keyframe_source: KeyframeSource = "tokenizer",
                 keyframe_tokenizer_export: str | None = None, keyframe_backbone_weights: str | None = None,
                 text_corpus: str | None = None, val_text_corpus: str | None = None,
                 image_text: str | None = None, val_image_text: str | None = None,
                 weights: dict[str, float] | None = None, visual_first_prob: float = 0.5,
                 supervise: Literal["all", "target"] = "all", open_rows: int = 4, text_shuffle_buffer: int = 1000,
                 tokenizer_device: str = "cpu", cache_videos: int = 0, clip_frames: int = CLIP_FRAMES,
                 max_clips: int = 8, clips_per_video: str = "all"):
        super().__init__(tokenizer_path, vocabulary=vocabulary, seq_len=seq_len, motion_source=motion_source,
                         motion_tokenizer_export=motion_tokenizer_export, token_dump=token_dump,
                         keyframe_source=keyframe_source, keyframe_tokenizer_export=keyframe_tokenizer_export,
                         keyframe_backbone_weights=keyframe_backbone_weights, open_rows=open_rows,
                         tokenizer_device=tokenizer_device, cache_videos=cache_videos, clip_frames=clip_frames,
                         max_clips=max_clips, clips_per_video=clips_per_video)
        self.text_corpus, self.val_text_corpus = text_corpus, val_text_corpus
        self.image_text, self.val_image_text = image_text, val_image_text
        self.weights = dict(weights) if weights is not None else {"video_text": 1.0, "text": 1.0}
        self.visual_first_prob, self.supervise = float(visual_first_prob), supervise
        self.text_shuffle_buffer = int(text_shuffle_buffer)
        unknown = set(self.weights) - {"video_text", "image_text", "text"}
        if unknown or any(w < 0 for w in self.weights.values()):
            raise ValueError(f"weights name the sources 'video_text', 'image_text' and 'text' with non-negative "
                             f"values, got {self.weights}")
        if self.weights.get("image_text", 0.0) > 0 and image_text is not None and keyframe_tokenizer_export is None:
            raise ValueError("image_text pairs need keyframe_tokenizer_export (images are tokenised on the fly)")
        if not 0.0 <= self.visual_first_prob <= 1.0:
            raise ValueError("visual_first_prob must lie in [0, 1]")
        if supervise not in ("all", "target"):
            raise ValueError(f"supervise must be 'all' or 'target', got {supervise!r}")

    # ---- documents ------------------------------------------------------------------------------
    def pair_document(self, visual_ids: list[int], caption: str, visual_first: bool) -> TokenSequence:
        """``bos video caption eos`` or ``bos caption video eos`` (``multimodal_pair``)."""
        tok = self.tokenizer
        text_ids = tok(caption, add_special_tokens=False)["input_ids"]
        order = "visual_text" if visual_first else "text_visual"
        vocab = self.vocabulary
        if visual_ids[0] == vocab.image_start_id:
            return multimodal_pair(visual_ids, text_ids, vocab, order=order, bos_id=tok.bos_token_id,
                                   eos_id=tok.eos_token_id, supervise=self.supervise)
        # keyframe_source="none": the video starts with [MOV], which multimodal_pair refuses (it checks for
        # [IMG]). Build the pair with a stand-in [IMG] in front and take the stand-in out again: every
        # other id and label is then exactly what multimodal_pair gives.
        pair = multimodal_pair([vocab.image_start_id, *visual_ids], text_ids, vocab, order=order,
                               bos_id=tok.bos_token_id, eos_id=tok.eos_token_id, supervise=self.supervise)
        stand_in = 1 + (0 if visual_first else len(text_ids))  # after bos (always given here)
        del pair.input_ids[stand_in], pair.labels[stand_in]
        return pair

    def video_documents(self, samples: Iterable[dict], train: bool, rng: random.Random) -> Iterator[TokenSequence]:
        """One pair document per usable video sample; unusable ones are counted by reason and skipped."""
        for raw in samples:
            key = raw.get("__key__", "?")
            try:
                sample = decode_sample(raw, need_video=self.need_video)
                starts = self.clip_starts(sample, train, rng)
                keyframes, motions = self.video_codes(sample, starts)
            except errors.VideoSkip as skip:
                SKIPS.record(key, skip.reason, skip.detail)
                continue
            SKIPS.delivered()
            order_rng = rng if train else random.Random(zlib.crc32(sample["key"].encode("utf-8")))
            visual_first = order_rng.random() < self.visual_first_prob
            yield self.pair_document(self.video_ids(keyframes, motions), sample["caption"], visual_first)

    def text_documents(self, train: bool, rng: random.Random) -> Iterator[TokenSequence] | None:
        """Text-only documents of this reader's share of the corpus: endless and shuffled in training,
        one pass in file order for validation; None without a corpus."""
        path = self.text_corpus if train else self.val_text_corpus
        if path is None or self.weights.get("text", 0.0) <= 0:
            return None
        if not Path(path).is_file():
            raise FileNotFoundError(f"text corpus {path} does not exist")
        slot, slots = _reader_slot()
        tok = self.tokenizer

        def document(line: str) -> TokenSequence:
            ids = tok(line, add_special_tokens=False)["input_ids"]
            return text_document(ids, self.vocabulary, bos_id=tok.bos_token_id, eos_id=tok.eos_token_id)

        def endless() -> Iterator[TokenSequence]:
            # Passes over the file without end; a line leaves a shuffle buffer at a random place.
            buffer: list[str] = []
            size = max(1, self.text_shuffle_buffer)
            share = (slot, slots)
            while True:
                seen = False
                for line in read_text_lines(path, *share):
                    seen = True
                    buffer.append(line)
                    if len(buffer) >= size:
                        pick = rng.randrange(len(buffer))
                        buffer[pick], buffer[-1] = buffer[-1], buffer[pick]
                        yield document(buffer.pop())
                if not seen:
                    if share == (0, 1):
                        raise ValueError(f"text corpus {path} has no non-empty line")
                    share = (0, 1)  # fewer lines than readers: this reader draws from the whole file

        if train:
            return endless()
        return (document(line) for line in read_text_lines(path, slot, slots))

    def image_text_documents(self, train: bool, rng: random.Random) -> Iterator[TokenSequence] | None:
        """Image-text pair documents of this reader's share of the JSONL: endless and reshuffled every pass in
        training, one pass in file order for validation; None without a file."""
        path = self.image_text if train else self.val_image_text
        if path is None or self.weights.get("image_text", 0.0) <= 0:
            return None
        if not Path(path).is_file():
            raise FileNotFoundError(f"image-text file {path} does not exist")
        from datamodules.instruct_views import load_image_text_pair

        root = Path(path).parent
        slot, slots = _reader_slot()
        lines = list(read_text_lines(path, slot, slots)) or list(read_text_lines(path))

        def document(line: str) -> TokenSequence | None:
            pair = load_image_text_pair(line, root, self.keyframe_image_size())
            if pair is None:
                return None
            pixels, caption, image = pair
            SKIPS.delivered()
            codes = self.image_codes(pixels[None])[0]
            order_rng = rng if train else random.Random(zlib.crc32(str(image).encode("utf-8")))
            return self.pair_document(image_token_ids(codes, self.vocabulary), caption,
                                      order_rng.random() < self.visual_first_prob)

        def passes() -> Iterator[str]:
            while True:
                order = list(lines)
                rng.shuffle(order)
                yield from order

        return (doc for doc in map(document, passes() if train else lines) if doc is not None)

    def documents(self, samples: Iterable[dict], train: bool, rng: random.Random) -> Iterator[TokenSequence]:
        """The mixed document stream (video-text pairs, image-text pairs and text-only documents)."""
        sources: dict[str, Iterable] = {}
        weights: dict[str, float] = {}
        if self.weights.get("video_text", 0.0) > 0:
            sources["video_text"] = self.video_documents(samples, train, rng)
            weights["video_text"] = self.weights["video_text"]
        images = self.image_text_documents(train, rng)
        if images is not None:
            sources["image_text"], weights["image_text"] = images, self.weights["image_text"]
        text = self.text_documents(train, rng)
        if text is not None:
            sources["text"], weights["text"] = text, self.weights["text"]
        if not sources:
            raise ValueError("PretrainSequenceView: no source to draw from (check weights and text corpora)")
        # Training: the shard stream is endless and the text corpus cycles, stop when either ends (a finite
        # stream in tests). Validation: every sample and every line once ("drop" keeps mixing the rest).
        mixer = SourceMixer(sources, weights, seed=rng.randrange(2 ** 31), on_exhausted="stop" if train else "drop")
        for _, doc in mixer:
            yield doc

    def __call__(self, samples: Iterable[dict], train: bool = False, rng: random.Random | None = None
                 ) -> Iterator[PackedRow]:
        rng = rng or random.Random(0)
        yield from pack_documents(self.documents(samples, train, rng), seq_len=self.seq_len,
                                  pad_id=self.tokenizer.pad_token_id, open_rows=self.open_rows, stats=self.stats)


__all__ = ["PretrainSequenceView", "VideoTokenView", "MISSING_TOKENS", "captions_of_shards", "read_text_lines"]
