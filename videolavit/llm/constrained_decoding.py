"""Decoding constraints for visual generation, and classifier-free guidance (CFG) for the LLM.

The release generates a clip in two ``generate`` calls, each with suppression lists, and then truncates or pads
the motion codes to the fixed 135 the video detokenizer needs. ``VisualBlockConstraint`` does the same in one
pass and (ours) makes the motion length exact by construction; the release's variable length is an option
(details in its docstring).

Processors are plain callables ``(input_ids [B, T] long, scores [B, V] float) -> scores`` on torch
tensors, so they work in a hand-written sampling loop and inside ``transformers``'
``LogitsProcessorList`` alike. Order matters: combine CFG on raw logits first, then constrain
(constraining first puts -inf on both branches and the CFG difference becomes NaN). That is also the
order transformers uses (its CFG processor runs before ``suppress_tokens``).
"""

from __future__ import annotations

import torch

from videolavit.llm.vocabulary import Vocabulary

MOTION_LENGTH = 135            # motion codes per clip in the release (``motion_token_length``)
KEYFRAME_MAX_LENGTH = 256      # LaVIT keeps at most all 16x16 patches of a 224 image
KEYFRAME_GUIDANCE_SCALE = 4.0  # release CFG scale while generating keyframe codes
MOTION_GUIDANCE_SCALE = 7.0    # release CFG scale while generating motion codes
RELEASE_MIN_NEW_TOKENS = 20    # the release's min_new_tokens of both blocks: no end marker before 20 codes
RELEASE_MAX_NEW_TOKENS = 500   # and its max_new_tokens (``max_length`` of generate_video)


def classifier_free_guidance(cond_logits: torch.Tensor, uncond_logits: torch.Tensor, scale: float,
                             log_softmax_first: bool = True) -> torch.Tensor:
    """``uncond + scale * (cond - uncond)`` over the last dimension (vocabulary).

    With ``log_softmax_first`` (default) both branches are log-normalised first, which is what the
    release gets from transformers' ``UnbatchedClassifierFreeGuidanceLogitsProcessor``; there the
    unconditional branch, when no negative prompt is given, is the prompt's last token alone
    (``[IMG]`` or ``[MOV]``). ``scale=1`` returns the conditional branch.
    """
    if cond_logits.shape != uncond_logits.shape:
        raise ValueError(f"shapes differ: {tuple(cond_logits.shape)} vs {tuple(uncond_logits.shape)}")
    if log_softmax_first:
        cond_logits = torch.log_softmax(cond_logits.float(), dim=-1)
        uncond_logits = torch.log_softmax(uncond_logits.float(), dim=-1)
    return uncond_logits + scale * (cond_logits - uncond_logits)


class VisualBlockConstraint:
    """Restrict sampling inside visual blocks to the right code range; outside them, leave text free.

    * after ``[IMG]`` (until ``[/IMG]``): keyframe codes only; ``[/IMG]`` allowed once
      ``keyframe_min_length`` codes are out and forced at ``keyframe_max_length``;
    * right after ``[/IMG]``, with ``motion_after_keyframe`` (video generation): ``[MOV]`` is forced;
    * after ``[MOV]``: motion codes only, exactly ``motion_length`` of them, then ``[/MOV]`` is forced.

    The state of each row is read from its ids (the latest marker wins), so the processor is
    stateless and a batch may have rows in different blocks.

    The release generates a clip in two ``generate`` calls: keyframe codes after ``[IMG]`` until ``[/IMG]``
    (text and motion ids suppressed), then motion codes after ``[MOV]`` until ``[/MOV]`` (everything below
    ``[MOV]`` suppressed), and afterwards truncates or pads (with code 0) the motion codes to the fixed 135 the
    video detokenizer needs. This processor does the same in one pass and (ours) makes the motion length exact
    by construction: inside ``[MOV]`` only motion codes are allowed until ``motion_length`` of them are out,
    then ``[/MOV]`` is forced. With ``motion_min_length`` set it is the release's instead: ``[/MOV]`` may come
    once that many codes are out (its ``min_new_tokens``), and is forced at ``motion_max_length``; the caller
    pads or truncates.
    """

    def __init__(self, vocab: Vocabulary, motion_length: int = MOTION_LENGTH, keyframe_min_length: int = 1,
                 keyframe_max_length: int | None = KEYFRAME_MAX_LENGTH, motion_after_keyframe: bool = True,
                 motion_min_length: int | None = None, motion_max_length: int = RELEASE_MAX_NEW_TOKENS) -> None:
        if motion_length < 1 or keyframe_min_length < 1:
            raise ValueError("motion_length and keyframe_min_length must be at least 1")
        if motion_min_length is not None and not 1 <= motion_min_length <= motion_max_length:
            raise ValueError("motion_min_length must be in [1, motion_max_length]")
        self.motion_min_length, self.motion_max_length = motion_min_length, motion_max_length
        if keyframe_max_length is not None and keyframe_max_length < keyframe_min_length:
            raise ValueError("keyframe_max_length is below keyframe_min_length")
        self.vocab = vocab
        self.motion_length = motion_length
        self.keyframe_min_length = keyframe_min_length
        self.keyframe_max_length = keyframe_max_length
        self.motion_after_keyframe = motion_after_keyframe
        self._cached_key: tuple | None = None
        self._cached_table: torch.Tensor | None = None

    # Row states; ``allowed`` looks each row's state up in a [states, V] table (few ops per step).
    (FREE, KEYFRAME_CODES, KEYFRAME_CODES_OR_CLOSE, KEYFRAME_CLOSE, OPEN_MOTION, MOTION_CODES, MOTION_CLOSE,
     MOTION_CODES_OR_CLOSE) = range(8)

    def _table(self, vocab_size: int, device: torch.device) -> torch.Tensor:
        key = (vocab_size, str(device))
        if self._cached_key != key:
            v = self.vocab
            table = torch.zeros(8, vocab_size, dtype=torch.bool, device=device)
            table[self.FREE] = True
            table[self.KEYFRAME_CODES, v.visual_range.start:v.visual_range.stop] = True
            table[self.KEYFRAME_CODES_OR_CLOSE] = table[self.KEYFRAME_CODES]
            table[self.KEYFRAME_CODES_OR_CLOSE, v.image_end_id] = True
            table[self.KEYFRAME_CLOSE, v.image_end_id] = True
            table[self.OPEN_MOTION, v.motion_start_id] = True
            table[self.MOTION_CODES, v.motion_range.start:v.motion_range.stop] = True
            table[self.MOTION_CLOSE, v.motion_end_id] = True
            table[self.MOTION_CODES_OR_CLOSE] = table[self.MOTION_CODES]
            table[self.MOTION_CODES_OR_CLOSE, v.motion_end_id] = True
            self._cached_key, self._cached_table = key, table
        return self._cached_table

    def states(self, input_ids: torch.Tensor) -> torch.Tensor:
        """[B] state of each row, from the latest block marker in it and the tokens since."""
        length = input_ids.shape[1]
        markers = torch.tensor(self.vocab.special_ids, device=input_ids.device)       # [4]
        hits = input_ids.unsqueeze(-1) == markers                                     # [B, T, 4]
        positions = torch.arange(1, length + 1, device=input_ids.device).view(1, -1, 1)
        last = (hits * positions).amax(dim=1) - 1                                     # [B, 4], -1 = absent
        latest_position, latest = last.max(dim=-1)                                    # which marker came last
        since = length - 1 - latest_position                                          # tokens after it
        free = torch.full_like(latest, self.FREE)
        keyframe = torch.where(since >= self.keyframe_min_length, self.KEYFRAME_CODES_OR_CLOSE, self.KEYFRAME_CODES)
        if self.keyframe_max_length is not None:
            keyframe = torch.where(since >= self.keyframe_max_length, self.KEYFRAME_CLOSE, keyframe)
        after_keyframe = free
        if self.motion_after_keyframe:
            after_keyframe = torch.where(since == 0, self.OPEN_MOTION, self.FREE)
        if self.motion_min_length is None:  # ours: exactly motion_length codes
            motion = torch.where(since >= self.motion_length, self.MOTION_CLOSE, self.MOTION_CODES)
        else:  # the release: [/MOV] from motion_min_length codes on, forced at motion_max_length
            motion = torch.where(since >= self.motion_min_length, self.MOTION_CODES_OR_CLOSE, self.MOTION_CODES)
            motion = torch.where(since >= self.motion_max_length, self.MOTION_CLOSE, motion)
        state = torch.where(latest == 0, keyframe, free)        # [IMG] ...
        state = torch.where(latest == 1, after_keyframe, state)  # [/IMG] ...
        state = torch.where(latest == 2, motion, state)          # [MOV] ...
        return torch.where(latest_position < 0, free, state)     # no marker yet: text

    def allowed(self, input_ids: torch.Tensor, vocab_size: int) -> torch.Tensor:
        """Boolean ``[B, V]``: which ids each row may produce next."""
        if vocab_size < self.vocab.size:
            raise ValueError(f"scores have {vocab_size} ids, the vocabulary needs {self.vocab.size}")
        return self._table(vocab_size, input_ids.device)[self.states(input_ids)]

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        allowed = self.allowed(input_ids, scores.shape[-1])
        return scores.masked_fill(~allowed, float("-inf"))


class TextOnlyConstraint:
    """Suppress every non-text id (markers, keyframe and motion codes) when generating an answer.

    The release does the same for understanding (``suppress_tokens`` = all ids from 32000 up).
    """

    def __init__(self, vocab: Vocabulary) -> None:
        self.vocab = vocab

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        scores = scores.clone()
        scores[..., self.vocab.text_size:] = float("-inf")
        return scores
