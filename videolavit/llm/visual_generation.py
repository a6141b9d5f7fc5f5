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
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from videolavit.llm.constrained_decoding import (KEYFRAME_GUIDANCE_SCALE, MOTION_GUIDANCE_SCALE,
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
                                       keyframe_max_length=options.keyframe_max_length)
    ids = list(prompt_ids)
    if not ids or constraint.states(torch.tensor([ids]))[0] == constraint.FREE:
        ids.append(vocab.image_start_id)  # open the first clip
    visual_start = next(i for i, t in enumerate(ids) if t not in vocab.text_range)
    uncond_ids = list(unconditional_prefix if unconditional_prefix is not None else ids[:1]) + ids[visual_start:]
    guided = options.keyframe_guidance != 1.0 or options.motion_guidance != 1.0
    cond = _Branch(llm, ids, device)
    uncond = _Branch(llm, uncond_ids, device) if guided else None

    clips, current = [], GeneratedClip()
    while True:
        state = int(constraint.states(torch.tensor([ids]))[0])
        allowed = constraint.allowed(torch.tensor([ids]), cond.logits.numel())[0].to(device)
        if state == constraint.FREE:  # after [/MOV]: a clip is complete
            clips.append(current)
            if len(clips) == num_clips:
                return clips
            current, token = GeneratedClip(), vocab.image_start_id
        elif int(allowed.sum()) == 1:  # a forced marker
            token = int(allowed.nonzero()[0])
        else:
            in_motion = state in (constraint.MOTION_CODES, constraint.MOTION_CLOSE)
            scale = options.motion_guidance if in_motion else options.keyframe_guidance
            temperature = options.temperature
            if not in_motion and options.keyframe_temperature is not None:
                temperature = options.keyframe_temperature
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
        if uncond is not None:
            uncond.feed([token])
