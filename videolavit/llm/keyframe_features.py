"""How an LLM reads keyframes: as code ids, or as continuous features (the release's understanding model).

Our stages train LLMs that read keyframe code ids; the release's SFT model reads each keyframe as the keyframe
tokenizer's continuous features. An LLM export records which in ``videolavit_llm.json`` (``keyframe_input``:
``"codes"`` or ``"continuous"``). This module holds what the continuous path needs: the spec file, the features
(``continuous_keyframe_features``), id sequences with one ``KEYFRAME_SLOT_ID`` per keyframe
(``continuous_clip_ids``) and their embeddings with the features spliced in (``splice_keyframe_features``). What
is frozen and what trains, and how stage 3 and chat use it: docs/design.md §8 ("Keyframes as codes or as
features").
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from videolavit.llm.sequences import IGNORE_INDEX

KEYFRAME_INPUTS = ("codes", "continuous")
KEYFRAME_SLOT_ID = -200  # in an id sequence of the continuous path: one keyframe's features go here
LLM_SPEC_FILE = "videolavit_llm.json"


class KeyframeInputError(ValueError):
    """An unknown ``keyframe_input``, an unreadable LLM spec, or slots that do not match the features given."""


def check_keyframe_input(value: str) -> str:
    if value not in KEYFRAME_INPUTS:
        raise KeyframeInputError(f"keyframe_input must be one of {list(KEYFRAME_INPUTS)}, got {value!r}")
    return value


def read_keyframe_input(directory: str | Path) -> str:
    """The ``keyframe_input`` an LLM export records (``"codes"`` when it has no spec: our stages' exports)."""
    path = Path(directory) / LLM_SPEC_FILE
    if not path.is_file():
        return "codes"
    try:
        spec = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise KeyframeInputError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(spec, dict):
        raise KeyframeInputError(f"{path} must hold a JSON object")
    return check_keyframe_input(spec.get("keyframe_input", "codes"))


def write_llm_spec(directory: str | Path, keyframe_input: str, **extra) -> Path:
    path = Path(directory) / LLM_SPEC_FILE
    path.write_text(json.dumps({"keyframe_input": check_keyframe_input(keyframe_input), **extra}, indent=2))
    return path


def continuous_keyframe_features(tokenizer, images: torch.Tensor) -> list[torch.Tensor]:
    """Images [N, 3, S, S] in [0, 1] -> per image its kept tokens' features [n_i, llm_dim] (the release's
    ``encode_features``). Gradients reach the merger and ``vit_proj`` only."""
    with torch.no_grad():
        features = tokenizer.vit_patch_features(images)
        log_probs = tokenizer.token_predictor(features)
        keep = F.gumbel_softmax(log_probs.float(), tau=tokenizer.config.gumbel_tau, hard=True)[..., 0]
        best = F.one_hot(log_probs[..., 0].argmax(dim=1), keep.shape[1]).bool()  # never an empty keyframe
        keep = torch.where((keep.sum(dim=1, keepdim=True) == 0) & best, torch.ones_like(keep), keep)
    merged = tokenizer.vit_proj(tokenizer.causal_encoder(features, keep))
    kept = keep > 0.5
    return [merged[i][kept[i]] for i in range(merged.shape[0])]


def splice_keyframe_features(embed: torch.nn.Module, rows: Sequence[Sequence[int]],
                             features: Sequence[Sequence[torch.Tensor]], labels: Sequence[Sequence[int]] | None = None,
                             padding_side: str = "left", max_length: int | None = None) -> dict:
    """Input embeddings of id rows whose ``KEYFRAME_SLOT_ID`` entries are replaced, in order, by
    ``features[row][k]`` ([n, D] each): ``{"inputs_embeds" [B, L, D], "attention_mask" [B, L] long,
    "position_ids" [B, L], "labels" [B, L] (-100 on slots and padding; only with ``labels``)}``.

    Padding (zero embeddings, mask 0) on ``padding_side`` (left for generation, as the release's
    understanding runner; right for training); ``max_length`` truncates each row first (the release's
    ``tokenizer_model_max_length``)."""
    if len(features) != len(rows):
        raise KeyframeInputError(f"{len(rows)} rows but features for {len(features)}")
    weight = embed.weight if hasattr(embed, "weight") else None
    device = weight.device if weight is not None else features[0][0].device
    pieces, targets = [], []
    for r, ids in enumerate(rows):
        ids = list(ids)
        slots = [i for i, t in enumerate(ids) if t == KEYFRAME_SLOT_ID]
        if len(slots) != len(features[r]):
            raise KeyframeInputError(f"row {r} has {len(slots)} keyframe slots but {len(features[r])} keyframes")
        bounds = [-1, *slots, len(ids)]
        parts, part_labels = [], []
        for k in range(len(bounds) - 1):
            text = ids[bounds[k] + 1: bounds[k + 1]]
            if text:
                parts.append(embed(torch.tensor(text, dtype=torch.long, device=device)))
                if labels is not None:
                    part_labels += list(labels[r][bounds[k] + 1: bounds[k + 1]])
            if k < len(slots):
                value = features[r][k]
                parts.append(value.to(device=device, dtype=parts[-1].dtype if parts else value.dtype))
                part_labels += [IGNORE_INDEX] * value.shape[0]
        row = torch.cat(parts)
        if max_length is not None:
            row, part_labels = row[:max_length], part_labels[:max_length]
        pieces.append(row)
        targets.append(part_labels)
    width = max(p.shape[0] for p in pieces)
    dim = pieces[0].shape[1]
    embeds = pieces[0].new_zeros(len(pieces), width, dim)
    mask = torch.zeros(len(pieces), width, dtype=torch.long, device=device)
    positions = torch.zeros(len(pieces), width, dtype=torch.long, device=device)
    out_labels = torch.full((len(pieces), width), IGNORE_INDEX, dtype=torch.long, device=device)
    for r, row in enumerate(pieces):
        n = row.shape[0]
        span = slice(width - n, width) if padding_side == "left" else slice(0, n)
        embeds[r, span] = row
        mask[r, span] = 1
        positions[r, span] = torch.arange(n, device=device)
        if labels is not None:
            out_labels[r, span] = torch.tensor(targets[r], dtype=torch.long, device=device)
    out = {"inputs_embeds": embeds, "attention_mask": mask, "position_ids": positions}
    if labels is not None:
        out["labels"] = out_labels
    return out


def continuous_clip_ids(motions: Sequence[Sequence[int]], vocabulary) -> list[int]:
    """Ids of a video on the continuous path: per clip ``[IMG] <slot> [/IMG] [MOV] motion [/MOV]``."""
    v = vocabulary
    ids: list[int] = []
    for motion in motions:
        ids += [v.image_start_id, KEYFRAME_SLOT_ID, v.image_end_id, v.motion_start_id]
        ids += [int(m) + v.motion_offset for m in motion]
        ids.append(v.motion_end_id)
    if not ids:
        raise ValueError("a video needs at least one clip")
    return ids


__all__ = ["KEYFRAME_INPUTS", "KEYFRAME_SLOT_ID", "LLM_SPEC_FILE", "KeyframeInputError", "check_keyframe_input",
           "read_keyframe_input", "write_llm_spec", "continuous_keyframe_features", "splice_keyframe_features",
           "continuous_clip_ids"]
