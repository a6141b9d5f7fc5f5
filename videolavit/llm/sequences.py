"""Token sequences for LLM pre-training: video/image blocks, multimodal pairs, packing, source mixing.

Conventions (shared with ``conversation``):

* ``labels`` are aligned with ``input_ids`` (Hugging Face convention: the model shifts them, so
  ``labels[i]`` is the target predicted from position ``i - 1``); ``IGNORE_INDEX`` (-100) = no loss.
* Visual content enters the LLM as discrete ids (``Vocabulary``), never through the text tokenizer.
* A video is a sequence of clips, each ``[IMG] keyframe codes [/IMG] [MOV] motion codes [/MOV]``.

Packed rows restart ``position_ids`` at 0 for every document, and transformers builds a block-causal mask
from the restarts only without a 2-D attention mask and without a KV cache: either one silently lets packed
documents attend to each other. ``collate_packed_rows``' docstring gives the contract with
``LlamaForCausalLM`` (checked by tests/test_sequences.py) and the explicit-mask alternative.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Literal

import numpy as np
import torch

from videolavit.llm.vocabulary import Vocabulary, VocabularyError

IGNORE_INDEX = -100
PAD_DOCUMENT_ID = -1  # document id of the padding tail of a packed row

PairOrder = Literal["visual_text", "text_visual"]
Supervision = Literal["all", "target"]


@dataclasses.dataclass
class TokenSequence:
    """One document: ids and their aligned labels (``IGNORE_INDEX`` where no loss is taken)."""

    input_ids: list[int]
    labels: list[int]

    def __post_init__(self) -> None:
        if len(self.input_ids) != len(self.labels):
            raise ValueError(f"input_ids ({len(self.input_ids)}) and labels ({len(self.labels)}) differ in length")

    def __len__(self) -> int:
        return len(self.input_ids)


# ---------------------------------------------------------------------------------------- visual blocks
def _as_list(codes) -> list[int]:
    return codes.tolist() if hasattr(codes, "tolist") else list(codes)


def image_token_ids(codes: Sequence[int], vocab: Vocabulary) -> list[int]:
    """``[IMG] keyframe ids [/IMG]`` for one image (or one clip's keyframe); codes in [0, visual_codes)."""
    codes = _as_list(codes)
    if not codes:
        raise VocabularyError("an image needs at least one keyframe code")
    return [vocab.image_start_id, *vocab.visual_id(codes), vocab.image_end_id]


def motion_token_ids(codes: Sequence[int], vocab: Vocabulary) -> list[int]:
    """``[MOV] motion ids [/MOV]`` for one clip; codes in [0, motion_codes)."""
    codes = _as_list(codes)
    if not codes:
        raise VocabularyError("a clip needs at least one motion code")
    return [vocab.motion_start_id, *vocab.motion_id(codes), vocab.motion_end_id]


def video_token_ids(keyframe_codes: Sequence[Sequence[int]], motion_codes: Sequence[Sequence[int]],
                    vocab: Vocabulary, motion_length: int | None = None) -> list[int]:
    """Ids of a whole video: per clip ``[IMG] keyframe [/IMG] [MOV] motion [/MOV]``, clips in time order.

    ``keyframe_codes[c]`` may vary in length from clip to clip (LaVIT's tokenizer is dynamic);
    ``motion_length``, if given, is checked for every clip (135 in the release's generation path).
    """
    if len(keyframe_codes) != len(motion_codes):
        raise ValueError(f"{len(keyframe_codes)} keyframes but {len(motion_codes)} motion clips")
    if not keyframe_codes:
        raise ValueError("a video needs at least one clip")
    ids: list[int] = []
    for clip, (keyframe, motion) in enumerate(zip(keyframe_codes, motion_codes)):
        motion = _as_list(motion)
        if motion_length is not None and len(motion) != motion_length:
            raise ValueError(f"clip {clip} has {len(motion)} motion codes, expected {motion_length}")
        ids += image_token_ids(keyframe, vocab) + motion_token_ids(motion, vocab)
    return ids


# ---------------------------------------------------------------------------------------- documents
def _check_text(text_ids: Sequence[int], vocab: Vocabulary) -> list[int]:
    text_ids = _as_list(text_ids)
    bad = [i for i in text_ids if not 0 <= i < vocab.text_size]
    if bad:
        raise VocabularyError(f"text id {bad[0]} is outside the text range [0, {vocab.text_size})")
    return text_ids


def _check_visual(visual_ids: Sequence[int], vocab: Vocabulary) -> list[int]:
    visual_ids = _as_list(visual_ids)
    if not visual_ids or visual_ids[0] != vocab.image_start_id:
        raise VocabularyError("visual ids must start with [IMG] (build them with video_token_ids/image_token_ids)")
    if min(visual_ids) < vocab.text_size and any(vocab.is_text(visual_ids)):  # min first: C speed per video
        raise VocabularyError("visual ids contain text ids")
    return visual_ids


def text_document(text_ids: Sequence[int], vocab: Vocabulary, *, bos_id: int, eos_id: int | None
                  ) -> TokenSequence:
    """A text-only document ``bos text eos``; every token but bos is a target."""
    body = _check_text(text_ids, vocab) + ([eos_id] if eos_id is not None else [])
    return TokenSequence([bos_id, *body], [IGNORE_INDEX, *body])


def multimodal_pair(visual_ids: Sequence[int], text_ids: Sequence[int], vocab: Vocabulary, *,
                    order: PairOrder, bos_id: int | None, eos_id: int | None,
                    supervise: Supervision = "all") -> TokenSequence:
    """One video-text (or image-text) pair as ``bos first second eos``.

    ``order="visual_text"`` ([video, text]) teaches understanding/captioning; ``order="text_visual"``
    ([text, video]) teaches generation. Pre-training uses both orders (paper §3.3, A.2).

    What is supervised (labels; bos is never a target):
      * ``supervise="all"`` (default): every token - text, visual codes, markers and eos. The paper
        trains the whole multimodal sequence with one next-token objective ("predicting the next
        visual/textual token in an auto-regressive manner"), so visual codes are learned as targets
        in both orders; this is what makes the LLM able to generate them.
      * ``supervise="target"``: only the second segment and eos (text after a video, the video after
        a text), i.e. a purely conditional loss, for ablations.

    The release's generation prompts are text without bos (``add_special_tokens=False``) followed by
    ``[IMG]``; pass ``bos_id=None`` to build that form.
    """
    visual = _check_visual(visual_ids, vocab)
    text = _check_text(text_ids, vocab)
    if order == "visual_text":
        first, second = visual, text
    elif order == "text_visual":
        first, second = text, visual
    else:
        raise ValueError(f"order must be 'visual_text' or 'text_visual', got {order!r}")
    if supervise not in ("all", "target"):
        raise ValueError(f"supervise must be 'all' or 'target', got {supervise!r}")
    head = [bos_id] if bos_id is not None else []
    tail = [eos_id] if eos_id is not None else []
    input_ids = head + first + second + tail
    first_labels = first if supervise == "all" else [IGNORE_INDEX] * len(first)
    labels = [IGNORE_INDEX] * len(head) + first_labels + second + tail
    if bos_id is None and labels:
        labels[0] = IGNORE_INDEX  # the first token has nothing to be predicted from
    return TokenSequence(input_ids, labels)


# ---------------------------------------------------------------------------------------- packing
@dataclasses.dataclass
class PackedRow:
    """One packed training row of exactly ``seq_len`` tokens."""

    input_ids: torch.Tensor     # [L] long
    labels: torch.Tensor        # [L] long; IGNORE_INDEX on padding and on every segment's first token
    position_ids: torch.Tensor  # [L] long; 0, 1, ... restarting at each segment (padding tail included)
    document_ids: torch.Tensor  # [L] long; 0..n-1 per segment in the row, PAD_DOCUMENT_ID on padding
    cu_seqlens: torch.Tensor    # [segments + 1] int32; boundaries of segments (padding tail included)

    @property
    def num_documents(self) -> int:
        return int(self.document_ids.max().item()) + 1 if bool((self.document_ids >= 0).any()) else 0


@dataclasses.dataclass
class PackingStats:
    """Counts for logging: nothing is dropped, so ``targets_in == targets_out`` always holds."""

    documents: int = 0
    split_documents: int = 0
    segments: int = 0
    rows: int = 0
    padding_tokens: int = 0
    targets_in: int = 0
    targets_out: int = 0


def split_document(doc: TokenSequence, seq_len: int) -> list[TokenSequence]:
    """Split a document longer than ``seq_len`` into segments of at most ``seq_len`` tokens.

    Consecutive segments overlap by one token: segment k+1 starts with the last token of segment k,
    unlabelled, as the context from which its second token is predicted. So every target of the
    document is a target exactly once and no token is dropped; each segment is then packed (and
    attended, and position-numbered from 0) as a document of its own. The split is by token count and
    may cut a clip; the loss over the cut only loses the attention to earlier segments.
    """
    if seq_len < 2:
        raise ValueError("seq_len must be at least 2")
    n = len(doc)
    if n <= seq_len:
        return [doc]
    segments, start = [], 0
    while start < n - 1:
        stop = min(start + seq_len, n)
        labels = list(doc.labels[start:stop])
        if start > 0:
            labels[0] = IGNORE_INDEX
        segments.append(TokenSequence(list(doc.input_ids[start:stop]), labels))
        start = stop - 1
    return segments


def _finish_row(segments: list[TokenSequence], seq_len: int, pad_id: int) -> PackedRow:
    lengths = [len(seg) for seg in segments]
    ids, labels = [], []
    for seg in segments:
        ids += seg.input_ids
        labels.append(IGNORE_INDEX)  # the first token is never predicted across a boundary
        labels += seg.labels[1:]
    used = len(ids)
    pad = seq_len - used
    ids += [pad_id] * pad
    labels += [IGNORE_INDEX] * pad
    # NumPy builds the index rows (the loader runs this for every row; a tensor from a long list is slow)
    sizes = np.array(lengths + ([pad] if pad else []), dtype=np.int64)
    starts = np.repeat(np.cumsum(sizes) - sizes, sizes)
    positions = np.arange(seq_len, dtype=np.int64) - starts
    documents = np.repeat(np.append(np.arange(len(segments)), PAD_DOCUMENT_ID)[:len(sizes)], sizes)
    bounds = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int32)
    as_long = lambda x: torch.from_numpy(np.asarray(x, dtype=np.int64))  # noqa: E731
    return PackedRow(as_long(ids), as_long(labels), torch.from_numpy(positions), torch.from_numpy(documents),
                     torch.from_numpy(bounds))


def pack_documents(docs: Iterable[TokenSequence], seq_len: int = 2048, pad_id: int = 0,
                   open_rows: int = 1, stats: PackingStats | None = None) -> Iterator[PackedRow]:
    """Pack documents into rows of exactly ``seq_len`` tokens (paper: 2048), streaming.

    Documents are never cut to fit a row: a document goes whole into the first open row with room;
    only documents longer than ``seq_len`` are split (``split_document``). With ``open_rows=1`` this is
    next-fit (order kept, a row is emitted as soon as the next document does not fit); more open rows
    give first-fit over a window, which pads less. Rows are padded with ``pad_id`` (label ignored, own
    document id ``PAD_DOCUMENT_ID`` and restarting positions so that padding attends only to padding).
    """
    if open_rows < 1:
        raise ValueError("open_rows must be at least 1")
    stats = stats if stats is not None else PackingStats()
    rows: list[list[TokenSequence]] = []
    used: list[int] = []

    def emit(index: int) -> PackedRow:
        segments = rows.pop(index)
        used.pop(index)
        row = _finish_row(segments, seq_len, pad_id)
        stats.rows += 1
        stats.padding_tokens += int((row.document_ids == PAD_DOCUMENT_ID).sum())
        stats.targets_out += int((row.labels != IGNORE_INDEX).sum())
        return row

    for doc in docs:
        if len(doc) == 0:
            raise ValueError("empty document")
        stats.documents += 1
        stats.targets_in += len(doc.labels) - 1 - doc.labels[1:].count(IGNORE_INDEX)
        segments = split_document(doc, seq_len)
        stats.split_documents += len(segments) > 1
        for seg in segments:
            stats.segments += 1
            target = next((i for i, u in enumerate(used) if u + len(seg) <= seq_len), None)
            if target is None:
                if len(rows) == open_rows:
                    yield emit(0)
                rows.append([])
                used.append(0)
                target = len(rows) - 1
            rows[target].append(seg)
            used[target] += len(seg)
    while rows:
        yield emit(0)


# ---------------------------------------------------------------------------------------- attention
def block_causal_mask(document_ids: torch.Tensor) -> torch.Tensor:
    """Boolean ``[..., L, L]`` mask, True where query q may attend key k: same document and k <= q.

    ``document_ids`` is ``[L]`` or ``[B, L]``; padding (``PAD_DOCUMENT_ID``) attends to padding only, so
    no row of the mask is empty (an empty row would make softmax NaN).
    """
    length = document_ids.shape[-1]
    same = document_ids.unsqueeze(-1) == document_ids.unsqueeze(-2)
    causal = torch.ones(length, length, dtype=torch.bool, device=document_ids.device).tril()
    return same & causal


def additive_attention_mask(allowed: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Boolean ``[L, L]`` / ``[B, L, L]`` mask -> float ``[B, 1, L, L]`` (0 attend, dtype-min blocked).

    This is the form transformers' 4-D ``attention_mask`` path expects for every implementation
    (eager adds it to the scores; sdpa takes it as ``attn_mask``). Use the model's dtype.
    """
    if allowed.dim() == 2:
        allowed = allowed.unsqueeze(0)
    if allowed.dim() != 3 or allowed.dtype != torch.bool:
        raise ValueError("expected a boolean [L, L] or [B, L, L] mask")
    blocked = torch.finfo(dtype).min
    out = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
    out.masked_fill_(~allowed, blocked)
    return out.unsqueeze(1)


def collate_packed_rows(rows: Sequence[PackedRow], attention: Literal["position_ids", "additive"] = "position_ids",
                        dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor | int]:
    """Stack rows into a batch for ``LlamaForCausalLM(**batch)``.

    Returns input_ids / labels / position_ids / document_ids ``[B, L]``, ``cu_seqlens`` over the
    flattened batch (int32) and ``max_seqlen``; with ``attention="additive"`` also the ``[B, 1, L, L]``
    ``attention_mask``. ``document_ids``, ``cu_seqlens`` and ``max_seqlen`` are not model arguments:
    pop them (or map them to flash-attention kwargs) before calling the model.

    Packing contract with transformers 5.23 ``LlamaForCausalLM`` (checked by tests/test_sequences.py):

    * Rows carry ``position_ids`` that restart at 0 for every document (and for the padding tail).
    * Path A (default; attention implementations that build their own mask: ``sdpa``, ``eager``,
      ``flex_attention``): pass ``input_ids``, ``position_ids``, ``use_cache=False`` and **no**
      ``attention_mask``. ``masking_utils.find_packed_sequence_indices`` then detects the restarts and
      builds a block-causal mask. Two silent failure modes, both leaking documents into each other:
      a 2-D all-ones ``attention_mask``, and a KV cache - ``LlamaModel`` creates a ``DynamicCache``
      whenever ``use_cache`` is true, which is the config default even in train mode, and detection
      only runs without a cache. Training code must set ``config.use_cache = False`` (or pass it).
    * Path B (explicit, independent of the cache): pass
      ``attention_mask=additive_attention_mask(block_causal_mask(document_ids), model_dtype)``, a float
      ``[B, 1, L, L]`` tensor (0 = attend, dtype-min = blocked); 4-D masks are used as given. A
      *boolean* 4-D mask is only right for ``sdpa`` - ``eager`` adds the mask to the scores, so it must
      be additive. Position ids must still be passed (RoPE). Costs O(B L^2) memory for the mask.
    * Flash-attention kernels take ``cu_seqlens`` (cumulative segment lengths over the flattened batch)
      as ``cu_seq_lens_q/k`` with ``max_length_q/k``; transformers also derives them from restarting
      ``position_ids`` when the batch is flattened to one row. (Not exercised on CPU.)
    """
    if not rows:
        raise ValueError("no rows")
    length = rows[0].input_ids.numel()
    batch: dict[str, torch.Tensor | int] = {
        key: torch.stack([getattr(r, key) for r in rows])
        for key in ("input_ids", "labels", "position_ids", "document_ids")
    }
    bounds = [torch.tensor([0], dtype=torch.int32)]
    for b, row in enumerate(rows):
        if row.input_ids.numel() != length:
            raise ValueError("rows of different lengths")
        bounds.append(row.cu_seqlens[1:] + b * length)
    cu = torch.cat(bounds)
    batch["cu_seqlens"] = cu
    batch["max_seqlen"] = int((cu[1:] - cu[:-1]).max())
    if attention == "additive":
        batch["attention_mask"] = additive_attention_mask(block_causal_mask(batch["document_ids"]), dtype)
    elif attention != "position_ids":
        raise ValueError(f"attention must be 'position_ids' or 'additive', got {attention!r}")
    return batch


# ---------------------------------------------------------------------------------------- mixing
class SourceMixer:
    """Draw items from several sources (video-text, image-text, text, ...) by mixing weights.

    Each draw picks a source with probability proportional to its weight, using ``random.Random(seed)``
    so the sequence of picks is reproducible; iterating again restarts the sources and the RNG.
    Yields ``(source_name, item)``. When a source runs out: ``on_exhausted="drop"`` removes it and
    keeps mixing the rest by their renormalised weights (no data is lost); ``"stop"`` ends the stream
    (keeps the mixture exact for finite sources). Training sources are usually endless (resampled).
    """

    def __init__(self, sources: Mapping[str, Iterable], weights: Mapping[str, float], seed: int = 0,
                 on_exhausted: Literal["drop", "stop"] = "drop") -> None:
        if set(sources) != set(weights):
            raise ValueError(f"sources {sorted(sources)} and weights {sorted(weights)} name different sources")
        if any(w < 0 for w in weights.values()) or not sum(weights.values()) > 0:
            raise ValueError(f"weights must be non-negative with a positive sum, got {dict(weights)}")
        if on_exhausted not in ("drop", "stop"):
            raise ValueError(f"on_exhausted must be 'drop' or 'stop', got {on_exhausted!r}")
        self.sources = dict(sources)
        self.weights = {name: float(weights[name]) for name in sources}
        self.seed = seed
        self.on_exhausted = on_exhausted

    def __iter__(self) -> Iterator[tuple[str, object]]:
        rng = random.Random(self.seed)
        live = {name: iter(src) for name, src in self.sources.items() if self.weights[name] > 0}
        while live:
            names = list(live)
            name = rng.choices(names, weights=[self.weights[n] for n in names])[0]
            try:
                item = next(live[name])
            except StopIteration:
                if self.on_exhausted == "stop":
                    return
                del live[name]
                continue
            yield name, item
