"""Token-sequence views for the LLM stages (docs/design.md §3, §8): token shard samples -> packed token rows.

The LLM stages read **token shards** (``python -m videolavit tokenize``; format ``videolavit.llm.token_shards``):
one sample per video holding, per clip, the keyframe code ids and motion code ids the frozen stage-1 tokenizers
gave. The shared ``VideoDataModule`` streams them like video shards (resampled and split by rank and worker in
training, each sample once in validation), so memory per process does not grow with the corpus, and the views
only decode small integer arrays: no tokenizer runs in a data worker.

``VideoTokenView`` is the shared base of the LLM views (this module's ``PretrainSequenceView`` and stage 3's
``datamodules.instruct_views.InstructionSequenceView``): tokenizer, id layout, checked token samples, and the
batch keys (``VideoTokenView.collate``). ``PretrainSequenceView`` mixes video-text, image-text and text-only
documents and packs them into rows without leaks between documents; its docstring lists the sources. Bad
samples are counted skips; token shards of another tokenizer stop the run (``TokenizerMismatchError``).
"""

from __future__ import annotations

import random
import zlib
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Literal

import numpy as np

from datamodules.image_files import load_image_text_pair
from datamodules.line_streams import read_text_lines, reader_lines
from datamodules.skip_tracker import SKIPS, SKIPS_KEY
from datamodules.token_source import TokenSource
from datamodules.views import SampleView
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
)
from videolavit.llm.text_tokenizer import load_text_tokenizer
from videolavit.llm.token_shards import MISSING_TOKENS, TokenSample, decode_token_sample
from videolavit.llm.video_codes import VideoCoder, exports_fingerprint, video_block_ids
from videolavit.llm.vocabulary import Vocabulary
from videolavit.models.export_names import KEYFRAME_TOKENIZER
from videolavit.video import errors


def captions_of_shards(shards: str | list[str]) -> Iterator[str]:
    """Every caption in the given (video or token) shards, streamed (for building a tiny tokenizer)."""
    from datamodules.shard_list import resolve_shards
    from datamodules.tar_reader import iter_tar_samples

    for url in resolve_shards(shards):
        for raw in iter_tar_samples(url):
            if "txt" in raw:
                yield raw["txt"].decode("utf-8")


class VideoTokenView(SampleView):
    """Base of the LLM views: a token shard sample -> its clips' LLM ids.

    Holds what every LLM stage shares: the text tokenizer, the id layout, reading and checking token samples
    (``token_sample``, ``video_tokens``), the image coder of the image sources and ``collate`` (the packed-row
    batch keys of ``collate``). Subclasses (``PretrainSequenceView``,
    ``datamodules.instruct_views.InstructionSequenceView``) turn the ids into documents.

    Keyframes (``keyframe_source``): ``"tokens"`` (default) reads each clip's keyframe ids from the token shards;
    ``"none"`` drops them - each clip is ``[MOV] motion codes [/MOV]`` only, a reduced setting for runs without a
    trained keyframe tokenizer (the LLM then never sees ``[IMG]`` blocks). It is never chosen implicitly.

    Bad input: a corrupt member, ids outside the vocabulary's code ranges, a clip without motion (or keyframe)
    ids, or a clip the view selects that was not tokenised are counted skips by reason; token shards of other
    tokenizers (other code counts, or another exports fingerprint than ``tokenizer_exports``' when it is set)
    raise ``TokenizerMismatchError`` at the first such sample - never a silent mix.

    Args:
        tokens: tokenizer, vocabulary, row length and packing, token shards' exports, keyframe source, image
            tokenizer, clips (``TokenSource``, whose fields the view also has as attributes).
    """

    name = "video_tokens"
    need_video = False

    def __init__(self, tokens: TokenSource):
        if not isinstance(tokens, TokenSource):
            raise TypeError(f"{type(self).__name__}: tokens must be a TokenSource, got {type(tokens).__name__}")
        super().__init__(clip_frames=tokens.clip_frames, max_clips=tokens.max_clips,
                         clips_per_video=tokens.clips_per_video)
        self.tokens = tokens
        self.tokenizer_path = tokens.tokenizer_path
        self.vocabulary = tokens.vocabulary or Vocabulary.release()
        self.seq_len, self.open_rows = int(tokens.seq_len), int(tokens.open_rows)
        self.keyframe_source = tokens.keyframe_source
        self.tokenizer_exports = tokens.tokenizer_exports
        self.image_tokenizer_export = tokens.image_tokenizer_export or tokens.tokenizer_exports
        self.keyframe_backbone_weights = tokens.keyframe_backbone_weights
        self.tokenizer_device = tokens.tokenizer_device
        self.stats = PackingStats()  # of this process (workers keep their own)
        self._tokenizer = None
        self._fingerprints: set[str] | None = None
        self._image_coder: VideoCoder | None = None

    # ---- lazily loaded per process (DataLoader workers load their own) ----------------------------
    @property
    def tokenizer(self):
        if self._tokenizer is None:
            self._tokenizer = load_text_tokenizer(self.tokenizer_path, self.vocabulary)
        return self._tokenizer

    def accepted_fingerprints(self) -> set[str] | None:
        """Fingerprints of ``tokenizer_exports`` (motion only, and motion + keyframe) or None (not checked)."""
        if self.tokenizer_exports is None:
            return None
        if self._fingerprints is None:
            found = {exports_fingerprint(self.tokenizer_exports, None)}
            if (Path(self.tokenizer_exports) / f"{KEYFRAME_TOKENIZER}.json").is_file():
                found.add(exports_fingerprint(self.tokenizer_exports, self.tokenizer_exports))
            self._fingerprints = found
        return self._fingerprints

    @property
    def image_coder(self) -> VideoCoder:
        """The keyframe tokenizer of the image sources (``image_tokenizer_export``)."""
        if self._image_coder is None:
            if self.image_tokenizer_export is None:
                raise ValueError("image sources are tokenised by a keyframe tokenizer: set image_tokenizer_export "
                                 "(or tokenizer_exports)")
            self._image_coder = VideoCoder(self.vocabulary, None, self.image_tokenizer_export,
                                           keyframe_backbone_weights=self.keyframe_backbone_weights,
                                           device=self.tokenizer_device)
        return self._image_coder

    def image_codes(self, images, export: str | None = None) -> list[list[int]]:
        """Keyframe code ids (variable length) of float images [N, 3, S, S] in [0, 1] at the ViT's size."""
        return [codes.tolist() for codes in self.image_coder.image_codes(images, export)]

    def keyframe_image_size(self, export: str | None = None) -> int:
        return self.image_coder.keyframe_image_size(export)

    # ---- one video ------------------------------------------------------------------------------
    def token_sample(self, raw: dict) -> TokenSample:
        """The checked token sample (raises ``TokenSampleSkip`` to skip it, ``TokenizerMismatchError`` to stop)."""
        return decode_token_sample(raw, self.vocabulary, need_keyframes=self.keyframe_source == "tokens",
                                   fingerprints=self.accepted_fingerprints())

    def video_tokens(self, sample: TokenSample, train: bool, rng: random.Random) -> list[int]:
        """LLM ids of the clips the view selects (``clip_starts``) from a token sample."""
        starts = self.clip_starts({"key": sample.key, "meta": sample.meta}, train, rng)
        keyframes, motions = sample.clips(starts)
        return self.video_ids(keyframes, motions)

    def video_ids(self, keyframes: list[np.ndarray] | None, motions) -> list[int]:
        """Vocabulary ids of a video: per clip ``[IMG] kf [/IMG] [MOV] motion [/MOV]`` (or motion only)."""
        return video_block_ids(keyframes, motions, self.vocabulary)

    def collate(self, examples: list[PackedRow]) -> dict:
        """Packed rows -> a batch (``B`` rows of ``L = seq_len`` tokens) with these keys:

        ==================  ========================================================================
        ``input_ids``       long [B, L]; padding is the tokenizer's pad id (unk for Llama)
        ``labels``          long [B, L]; aligned with ``input_ids`` (the model shifts), -100 = no loss
                            (padding, each document's first token)
        ``position_ids``    long [B, L]; restart at 0 for every document and for the padding tail
        ``document_ids``    long [B, L]; 0.. per document within the row, -1 on padding
        ``modality``        long [B, L]; ``Vocabulary.modality_of(input_ids)`` (0 text, 1 keyframe, 2 motion,
                            3 block markers). Since ``labels[i]`` is ``input_ids[i]`` wherever it is a
                            target, this is also the modality of the target at position ``i``
                            (per-modality losses).
        ``cu_seqlens``      int32 [segments + 1] over the flattened batch; ``max_seqlen`` int (flash-attention)
        ==================  ========================================================================

        Call the model with ``input_ids``, ``position_ids`` and ``use_cache=False`` only (see
        ``videolavit.llm.sequences.collate_packed_rows``: no 2-D attention mask, or documents leak into each
        other).
        """
        batch = collate_packed_rows(examples)
        batch["modality"] = self.vocabulary.modality_of(batch["input_ids"])
        SKIPS.delivered()
        batch[SKIPS_KEY] = SKIPS.snapshot()
        return batch


class PretrainSequenceView(VideoTokenView):
    """Packed video-text + image-text + text-only token rows of exactly ``seq_len`` ids, for stage 2.

    1. every token sample becomes one video-text *pair* document (``sequences.multimodal_pair``): its clips
       (``SampleView.clip_starts`` on the video's I-frames: up to ``max_clips`` 24-frame clips, which the
       tokenize job tokenised at its own ``--max-clips``) as ``[IMG] keyframe codes [/IMG] [MOV] motion codes
       [/MOV]`` per clip, and its caption. The order - ``[video, caption]`` (understanding) or ``[caption,
       video]`` (generation) - is drawn per sample: ``visual_first_prob`` is the probability of ``[video,
       caption]``; training draws it from the stream's seeded RNG, validation from the sample key (so
       validation does not depend on how samples are split over ranks and workers);
    2. text-only documents (``bos line eos``) stream from a local text file, one document per line
       (``datamodules.line_streams``: each reader its share of the lines, shuffled within a bounded buffer);
    3. image-text pairs stream from a local JSONL the same way; each image is tokenised by the keyframe
       tokenizer (``image_tokenizer_export``) when read;
    4. ``SourceMixer`` interleaves the sources by ``weights`` (counted in *documents*, not tokens);
    5. ``pack_documents`` packs them leak-free (position ids restart per document; no document is cut unless
       it is longer than ``seq_len``).

    Batch keys: ``VideoTokenView.collate``. Training is a shuffled stream (resampled shards, shuffled text,
    rows shuffled by the DataModule); validation is deterministic: every sample once, in shard order, each
    text line of ``val_text_corpus`` once.

    Args:
        tokens: what every LLM view shares (``TokenSource``: tokenizer, vocabulary, seq_len, exports, clips, ...).
        text_corpus: local text file of text-only training documents, one per line, streamed (None: none).
        val_text_corpus: same for validation (None: validation has video-text pairs only).
        image_text: local JSONL of image-text pairs, one ``{"image": path, "caption": str}`` per line (paths
            relative to the file's directory; e.g. CC3M/LAION fetched beforehand), streamed: each becomes
            ``[IMG] keyframe codes [/IMG]`` + caption in either order, like a one-keyframe video. Needs a
            keyframe tokenizer export (``image_tokenizer_export``). Unreadable images are counted skips.
        val_image_text: same for validation.
        weights: mixing weights per source, ``video_text``, ``image_text`` and ``text``, in documents.
        visual_first_prob: probability of the ``[video, caption]`` order (else ``[caption, video]``).
        supervise: ``"all"`` (every token of a pair is a target; paper) or ``"target"`` (second segment only).
        text_shuffle_buffer: lines held for shuffling the line sources in training (bounded memory).
    """

    name = "pretrain_sequence"

    def __init__(self, tokens: TokenSource, text_corpus: str | None = None, val_text_corpus: str | None = None,
                 image_text: str | None = None, val_image_text: str | None = None,
                 weights: dict[str, float] | None = None, visual_first_prob: float = 0.5,
                 supervise: Literal["all", "target"] = "all", text_shuffle_buffer: int = 1000):
        super().__init__(tokens)
        self.text_corpus, self.val_text_corpus = text_corpus, val_text_corpus
        self.image_text, self.val_image_text = image_text, val_image_text
        self.weights = dict(weights) if weights is not None else {"video_text": 1.0, "text": 1.0}
        self.visual_first_prob, self.supervise = float(visual_first_prob), supervise
        self.text_shuffle_buffer = int(text_shuffle_buffer)
        unknown = set(self.weights) - {"video_text", "image_text", "text"}
        if unknown or any(w < 0 for w in self.weights.values()):
            raise ValueError(f"weights name the sources 'video_text', 'image_text' and 'text' with non-negative "
                             f"values, got {self.weights}")
        if (self.weights.get("image_text", 0.0) > 0 and (image_text or val_image_text)
                and self.image_tokenizer_export is None):
            raise ValueError("image_text pairs need a keyframe tokenizer export (image_tokenizer_export or "
                             "tokenizer_exports): images are tokenised when read")
        if not 0.0 <= self.visual_first_prob <= 1.0:
            raise ValueError("visual_first_prob must lie in [0, 1]")
        if supervise not in ("all", "target"):
            raise ValueError(f"supervise must be 'all' or 'target', got {supervise!r}")

    # ---- documents ------------------------------------------------------------------------------
    def pair_document(self, visual_ids: list[int], caption: str, visual_first: bool) -> TokenSequence:
        """``bos video caption eos`` or ``bos caption video eos`` (``multimodal_pair``)."""
        tok = self.tokenizer
        text_ids = tok(caption, add_special_tokens=False, split_special_tokens=True)["input_ids"]
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
        """One pair document per usable token sample; unusable ones are counted by reason and skipped."""
        for raw in samples:
            key = raw.get("__key__", "?")
            try:
                sample = self.token_sample(raw)
                video = self.video_tokens(sample, train, rng)
            except errors.VideoSkip as skip:
                SKIPS.record(key, skip.reason, skip.detail)
                continue
            SKIPS.delivered()
            order_rng = rng if train else random.Random(zlib.crc32(sample.key.encode("utf-8")))
            visual_first = order_rng.random() < self.visual_first_prob
            yield self.pair_document(video, sample.caption, visual_first)

    def text_documents(self, train: bool, rng: random.Random) -> Iterator[TokenSequence] | None:
        """Text-only documents of this reader's share of the corpus, streamed: endless and shuffled in training,
        one pass in file order for validation; None without a corpus."""
        path = self.text_corpus if train else self.val_text_corpus
        if path is None or self.weights.get("text", 0.0) <= 0:
            return None
        if not Path(path).is_file():
            raise FileNotFoundError(f"text corpus {path} does not exist")
        tok = self.tokenizer

        def document(line: str) -> TokenSequence:
            ids = tok(line, add_special_tokens=False, split_special_tokens=True)["input_ids"]
            return text_document(ids, self.vocabulary, bos_id=tok.bos_token_id, eos_id=tok.eos_token_id)

        return map(document, reader_lines(path, train, rng, self.text_shuffle_buffer))

    def image_text_documents(self, train: bool, rng: random.Random) -> Iterator[TokenSequence] | None:
        """Image-text pair documents of this reader's share of the JSONL, streamed: endless and shuffled pass by
        pass in training, one pass in file order for validation; None without a file."""
        path = self.image_text if train else self.val_image_text
        if path is None or self.weights.get("image_text", 0.0) <= 0:
            return None
        if not Path(path).is_file():
            raise FileNotFoundError(f"image-text file {path} does not exist")
        root = Path(path).parent

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

        lines = reader_lines(path, train, rng, self.text_shuffle_buffer)
        return (doc for doc in map(document, lines) if doc is not None)

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
