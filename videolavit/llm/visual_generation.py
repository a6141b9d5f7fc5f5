"""LLM side of generation: sample the code blocks of one or more clips after a prompt (docs/design.md §8).

Per clip the LLM writes ``[IMG] keyframe codes [/IMG] [MOV] motion codes [/MOV]``. Inside a block only
that block's codes are allowed (``VisualBlockConstraint``), the motion block has exactly
``motion_length`` codes (what the motion tokenizer decodes), and each block has its own
classifier-free-guidance scale (release: 4.0 keyframe, 7.0 motion). The unconditional branch sees the
same visual tokens without the text prompt: the release's CFG processor with no negative prompt uses
the last token only, which for the first block is ``[IMG]`` or ``[MOV]`` alone; we keep the visual
history in that branch so that the second and later blocks of a clip stay coherent with the first.

Markers between blocks (``[/IMG]`` → ``[MOV]``, and ``[IMG]`` opening the next clip) are forced, never
sampled. Both branches keep a KV cache, so each generated token costs two single-token forwards.

``SamplingOptions.release()`` is the release's behaviour, for its weights (listed in its docstring).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from videolavit.llm.constrained_decoding import (KEYFRAME_GUIDANCE_SCALE, MOTION_GUIDANCE_SCALE,
                                                 RELEASE_MAX_NEW_TOKENS, RELEASE_MIN_NEW_TOKENS,
                                                 VisualBlockConstraint, classifier_free_guidance)
from videolavit.llm.vocabulary import Vocabulary


@dataclass
class GeneratedClip:
    keyframe: list[int] = field(default_factory=list)  # keyframe codes in [0, visual_codes); empty if given
    motion: list[int] = field(default_factory=list)  # exactly motion_length codes in [0, motion_codes)


@dataclass
class SamplingOptions:
    motion_length: int
    keyframe_max_length: int
    keyframe_min_length: int = 1
    keyframe_guidance: float = KEYFRAME_GUIDANCE_SCALE
    motion_guidance: float = MOTION_GUIDANCE_SCALE
    temperature: float = 1.0
    # The keyframe block's own temperature (None: ``temperature``). Greedy decoding suits the fixed-length
    # motion block, but a keyframe block ends only where ``[/IMG]`` wins, and the tokenizer's sampled
    # selection makes that point uncertain: greedily it rarely wins, and keyframes run to the length cap.
    keyframe_temperature: float | None = None
    top_k: int | None = None
    unconditional: str = "history"  # CFG branch: "history" (ours: visual tokens so far) | "block" (release)
    motion_min_length: int | None = None  # None (ours): exactly motion_length codes; else the release's
    #                                       free-length block, padded / truncated to motion_length
    motion_max_length: int = RELEASE_MAX_NEW_TOKENS
    motion_temperature: float | None = None  # None: ``temperature`` (release: 0, greedy)

    def __post_init__(self):
        if self.unconditional not in ("history", "block"):
            raise ValueError(f"unconditional must be 'history' or 'block', got {self.unconditional!r}")

    @classmethod
    def release(cls, motion_length: int, keyframe_max_length: int, **overrides) -> "SamplingOptions":
        """The release's generation.

        The release's behaviour, for its weights: the unconditional branch restarts at each block's opening marker
        (``[IMG]`` alone, then ``[MOV]`` alone, as its two ``generate`` calls do), keyframe blocks have at least 20
        codes, the motion block is greedy, may end at ``[/MOV]`` after 20 codes (at most 500), and is then padded
        with code 0 or truncated to ``motion_length``; the prompt is the text ids without BOS (the caller's, see
        ``TextToVideo``). The release's suppression lists also leave ids 0-2 (unk, bos, eos) open inside blocks and
        drops them afterwards; ours never emits them.
        """
        values = dict(keyframe_min_length=min(RELEASE_MIN_NEW_TOKENS, keyframe_max_length), unconditional="block",
                      motion_min_length=RELEASE_MIN_NEW_TOKENS, motion_temperature=0.0)
        return cls(motion_length=motion_length, keyframe_max_length=keyframe_max_length, **{**values, **overrides})


class _Branch:
    """One KV-cached sequence being extended token by token."""

    def __init__(self, llm, ids: list[int], device: torch.device):
        self.llm, self.device, self.cache, self.logits = llm, device, None, None
        self.length = 0
        self.feed(ids)

    @torch.no_grad()
    def feed(self, ids: list[int]) -> None:
        tokens = torch.tensor([ids], dtype=torch.long, device=self.device)
        positions = torch.arange(self.length, self.length + len(ids), device=self.device)[None]
        out = self.llm(input_ids=tokens, position_ids=positions, past_key_values=self.cache, use_cache=True)
        self.cache, self.logits = out.past_key_values, out.logits[0, -1].float()
        self.length += len(ids)


def _sample(scores: torch.Tensor, temperature: float, top_k: int | None, generator: torch.Generator | None) -> int:
    if temperature <= 0:
        return int(scores.argmax())
    scores = scores / temperature
    if top_k is not None and top_k < scores.numel():
        threshold = torch.topk(scores, top_k).values[-1]
        scores = scores.masked_fill(scores < threshold, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    return int(torch.multinomial(probs.cpu(), 1, generator=generator))


@torch.no_grad()
def generate_clips(llm, vocab: Vocabulary, prompt_ids: list[int], num_clips: int, options: SamplingOptions, *,
                   unconditional_prefix: list[int] | None = None,
                   generator: torch.Generator | None = None) -> list[GeneratedClip]:
    """Sample ``num_clips`` clips after ``prompt_ids`` (e.g. ``bos text``; may end inside a clip, e.g.
    ``... [IMG] codes [/IMG] [MOV]`` for image-to-video: that clip's keyframe is then not generated).

    ``unconditional_prefix`` (default: the prompt's first token, bos) starts the CFG branch; visual tokens
    the prompt already holds after its last text token are given to that branch too.
    """
    if num_clips < 1:
        raise ValueError(f"num_clips must be at least 1, got {num_clips}")
    device = next(llm.parameters()).device
    constraint = VisualBlockConstraint(vocab, motion_length=options.motion_length,
                                       keyframe_min_length=options.keyframe_min_length,
                                       keyframe_max_length=options.keyframe_max_length,
                                       motion_min_length=options.motion_min_length,
                                       motion_max_length=options.motion_max_length)
    block_branch = options.unconditional == "block"
    ids = list(prompt_ids)
    if not ids or constraint.states(torch.tensor([ids]))[0] == constraint.FREE:
        ids.append(vocab.image_start_id)  # open the first clip
    visual_start = next(i for i, t in enumerate(ids) if t not in vocab.text_range)
    if block_branch:  # the release: the open block's marker alone, and the codes written in it since
        opened = max(i for i, t in enumerate(ids) if t in (vocab.image_start_id, vocab.motion_start_id))
        uncond_ids = ids[opened:]
    else:
        uncond_ids = list(unconditional_prefix if unconditional_prefix is not None else ids[:1]) + ids[visual_start:]
    guided = options.keyframe_guidance != 1.0 or options.motion_guidance != 1.0
    cond = _Branch(llm, ids, device)
    uncond = _Branch(llm, uncond_ids, device) if guided else None

    clips, current = [], GeneratedClip()
    while True:
        state = int(constraint.states(torch.tensor([ids]))[0])
        allowed = constraint.allowed(torch.tensor([ids]), cond.logits.numel())[0].to(device)
        if state == constraint.FREE:  # after [/MOV]: a clip is complete
            if options.motion_min_length is not None:  # the release pads with code 0 or truncates
                current.motion = (current.motion + [0] * options.motion_length)[:options.motion_length]
            clips.append(current)
            if len(clips) == num_clips:
                return clips
            current, token = GeneratedClip(), vocab.image_start_id
        elif int(allowed.sum()) == 1:  # a forced marker
            token = int(allowed.nonzero()[0])
        else:
            in_motion = state in (constraint.MOTION_CODES, constraint.MOTION_CLOSE, constraint.MOTION_CODES_OR_CLOSE)
            scale = options.motion_guidance if in_motion else options.keyframe_guidance
            temperature = options.temperature
            if not in_motion and options.keyframe_temperature is not None:
                temperature = options.keyframe_temperature
            if in_motion and options.motion_temperature is not None:
                temperature = options.motion_temperature
            scores = cond.logits
            if uncond is not None and scale != 1.0:
                scores = classifier_free_guidance(cond.logits, uncond.logits, scale)
            token = _sample(scores.masked_fill(~allowed, float("-inf")), temperature, options.top_k, generator)
            if token in vocab.visual_range:
                current.keyframe.append(token - vocab.visual_offset)
            elif token in vocab.motion_range:
                current.motion.append(token - vocab.motion_offset)
        ids.append(token)
        cond.feed([token])
        if uncond is not None and block_branch and token in (vocab.image_start_id, vocab.motion_start_id):
            uncond = _Branch(llm, [token], device)  # a new block: the release's next generate call
        elif uncond is not None:
            uncond.feed([token])
