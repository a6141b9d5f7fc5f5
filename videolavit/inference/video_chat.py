"""Video chat: answer a question about a video with a trained LLM (stage 2 or stage 3 export).

A chat answers from the ids the LLM was trained on: the video is decomposed as ``prepare`` does, tokenised by
the tokenize job's own video coder and put into the conversation template's generation prompt, then decoded with
text ids only (the steps: docs/design.md §8, "Chat"). Errors a user can act on are named:
``ModelDirectoryError`` (missing or corrupt LLM export directory), ``TokenizerExportError`` (missing stage-1
exports) and ``VideoInputError`` (a video that cannot be used; its ``reason`` is one of ``videolavit.video.errors``,
e.g. ``unreadable`` or ``too_short``).

``generate_text`` (decoding) is shared with stage 3's validation (``stages.instruct``) and the ``chat`` command;
answers are scored by ``videolavit.evaluation.qa_score``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch

from videolavit.llm.constrained_decoding import TextOnlyConstraint
from videolavit.llm.keyframe_features import (KeyframeInputError, continuous_clip_ids, continuous_keyframe_features,
                                              read_keyframe_input, splice_keyframe_features)
from videolavit.llm.text_tokenizer import load_text_tokenizer
from videolavit.llm.video_codes import VideoCoder, TokenizerExportError
from videolavit.llm.conversation import LLAVA_V1, VIDEO_LAVIT_RELEASE, VIDEO_PLACEHOLDER, ConversationTemplate, Message
from videolavit.llm.vocabulary import VOCABULARY_FILE, Vocabulary, VocabularyFileError, read_vocabulary_file
from videolavit.video import errors
from videolavit.video.clips import select_clip_starts
from videolavit.video.decompose import DecomposeConfig, VideoSource, decompose_video

RELEASE_MIN_NEW_TOKENS = 8  # the release's understanding runner: min_length=8 (eos suppressed before)
TEMPLATES: dict[str, ConversationTemplate] = {"v1": LLAVA_V1, "video_lavit_release": VIDEO_LAVIT_RELEASE}


class ModelDirectoryError(FileNotFoundError):
    """The LLM directory is missing, incomplete or unreadable (not an LLM stage export)."""


class VideoInputError(ValueError):
    """A video that cannot be answered about; ``reason`` is a ``videolavit.video.errors`` name."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"cannot use this video ({reason})" + (f": {detail}" if detail else ""))
        self.reason, self.detail = reason, detail


def template_by_name(name: str) -> ConversationTemplate:
    if name not in TEMPLATES:
        raise ValueError(f"unknown conversation template {name!r}; known: {sorted(TEMPLATES)}")
    return TEMPLATES[name]


# ------------------------------------------------------------------------------------------- export dirs
def read_llm_vocabulary(directory: str | Path) -> Vocabulary:
    """The id layout an LLM export was trained with (``videolavit_vocabulary.json``)."""
    if not (Path(directory) / VOCABULARY_FILE).is_file():
        raise ModelDirectoryError(f"{directory} has no {VOCABULARY_FILE}: not an LLM export of the pretrain or "
                                  "instruct stage (their export writes it next to the model)")
    try:
        return read_vocabulary_file(directory)
    except VocabularyFileError as exc:
        raise ModelDirectoryError(str(exc)) from None


def check_llm_directory(directory: str | Path) -> Path:
    """An existing directory with a config and weights; raises ``ModelDirectoryError`` otherwise."""
    directory = Path(directory)
    if not directory.is_dir():
        raise ModelDirectoryError(f"LLM directory {directory} does not exist (pass the export_dir of the "
                                  "pretrain or instruct stage)")
    if not (directory / "config.json").is_file():
        raise ModelDirectoryError(f"{directory} has no config.json: not a Hugging Face model directory")
    if not any(directory.glob("*.safetensors")) and not any(directory.glob("*.bin")):
        raise ModelDirectoryError(f"{directory} has no weights (*.safetensors)")
    return directory


def load_llm(directory: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None):
    """``AutoModelForCausalLM`` from a local export (eval mode, cache on); named errors for bad directories."""
    from transformers import AutoModelForCausalLM

    directory = check_llm_directory(directory)
    try:
        model = AutoModelForCausalLM.from_pretrained(str(directory), local_files_only=True, dtype=dtype)
    except Exception as exc:  # noqa: BLE001 - corrupt files fail in many libraries' own error types
        raise ModelDirectoryError(f"cannot load the LLM in {directory}: {type(exc).__name__}: {exc}") from None
    return model.to(device).eval()


# ------------------------------------------------------------------------------------------- decoding
@torch.inference_mode()
def generate_text(model, prompts: Sequence[Sequence[int]], *, vocabulary: Vocabulary, eos_id: int, pad_id: int,
                  max_new_tokens: int = 32, do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0,
                  seed: int | None = None, synced_gpus: bool | None = None, min_new_tokens: int = 0,
                  keyframe_features: Sequence[Sequence[torch.Tensor]] | None = None) -> list[list[int]]:
    """Continue each prompt with text ids only, until eos (not returned) or ``max_new_tokens``.

    transformers' ``model.generate``: prompts are left-padded into one batch (``attention_mask`` hides the
    padding; generate derives ``position_ids`` from it) and decoded with the KV cache; ``TextOnlyConstraint``
    is a logits processor, eos stops a row, and sampling uses generate's temperature and top-p (no top-k).
    ``seed`` seeds sampling (the global RNG is forked, so callers' streams are untouched).
    ``synced_gpus`` (default: on when ``torch.distributed`` runs more than one rank): a rank whose rows
    are done keeps running forward passes until every rank is done, as FSDP needs (each forward
    all-gathers parameters, so every rank must run the same number of them). ``model`` is a
    transformers causal LM (the stages' ``llm`` with split vocabulary rows included).
    ``min_new_tokens``: eos is suppressed before that many new tokens (the release's understanding runner: 8).
    ``keyframe_features`` (continuous keyframe path, ``videolavit.llm.keyframe_features``): per prompt the
    features of its ``KEYFRAME_SLOT_ID`` entries; the prompts then enter as embeddings.
    """
    from transformers import GenerationConfig, LogitsProcessorList

    if not prompts:
        return []
    if any(len(p) == 0 for p in prompts):
        raise ValueError("empty prompt")
    if max_new_tokens < 1:
        raise ValueError("max_new_tokens must be at least 1")
    if do_sample and temperature <= 0:
        raise ValueError("temperature must be positive when sampling")
    if synced_gpus is None:
        synced_gpus = torch.distributed.is_available() and torch.distributed.is_initialized() \
            and torch.distributed.get_world_size() > 1
    device = next(model.parameters()).device
    width = max(len(p) for p in prompts)
    if keyframe_features is not None:
        inputs = splice_keyframe_features(model.get_input_embeddings(), prompts, keyframe_features,
                                          padding_side="left")
        inputs = {"inputs_embeds": inputs["inputs_embeds"], "attention_mask": inputs["attention_mask"]}
    else:
        ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
        mask = torch.zeros(len(prompts), width, dtype=torch.long)
        for row, prompt in enumerate(prompts):
            ids[row, width - len(prompt):] = torch.tensor(list(prompt), dtype=torch.long)
            mask[row, width - len(prompt):] = 1
        inputs = {"input_ids": ids.to(device), "attention_mask": mask.to(device)}
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=do_sample, eos_token_id=eos_id,
                              pad_token_id=pad_id, use_cache=True, min_new_tokens=min_new_tokens or None,
                              **({"temperature": temperature, "top_p": top_p, "top_k": 0} if do_sample else {}))
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else [], enabled=seed is not None):
        if seed is not None:
            torch.manual_seed(seed)
        out = model.generate(**inputs, generation_config=config,
                             logits_processor=LogitsProcessorList([TextOnlyConstraint(vocabulary)]),
                             synced_gpus=synced_gpus)
    if "input_ids" in inputs:  # from ids, generate returns the prompts too; from embeddings, new ids only
        out = out[:, width:]
    produced = []
    for row in out.tolist():
        produced.append(row[:row.index(eos_id)] if eos_id in row else row)
    return produced


# ------------------------------------------------------------------------------------------- the chat
class VideoChat:
    """Answer questions about videos with an LLM export and the frozen stage-1 tokenizers.

    Args:
        model_dir: an LLM export (``export_dir`` of the pretrain or instruct stage, or an imported release
            LLM): HF model, its tokenizer and ``videolavit_vocabulary.json``. Its ``keyframe_input``
            (``videolavit.llm.keyframe_features``) says how keyframes enter: ``"codes"`` (our stages) or
            ``"continuous"`` (the release's SFT model: its own keyframe and motion tokenizer exports, in
            ``model_dir``, are used, and ``tokenizers_dir`` only for what it lacks).
        tokenizers_dir: directory with the stage-1 exports ``motion_tokenizer.*`` and (unless
            ``keyframe_source="none"``) ``keyframe_tokenizer.*``, e.g. runs/tiny/exports.
        keyframe_source: ``"tokenizer"`` (default) or ``"none"`` for an LLM trained without keyframe codes
            (clips are then ``[MOV] motion [/MOV]`` only; must match how the LLM was trained).
        keyframe_backbone_weights: local ViT weight file, overriding the path recorded in the keyframe export.
        template: ``"v1"`` (LLaVA v1.5, training default) or ``"video_lavit_release"``.
        max_clips: clips per video (as ``prepare --max-clips`` and the views' ``max_clips``).
        decompose: re-encode settings (``prepare``'s defaults).
        device, dtype: where and in which dtype the LLM runs; the tokenizers run on ``device`` too.
        seed: seeds the keyframe tokenizer's patch sampling per call (reproducible answers).
        min_new_tokens: eos is not allowed before this many answer tokens; None: 8 for an imported release LLM
            (the release's understanding runner), else 0.
    """

    def __init__(self, model_dir: str | Path, tokenizers_dir: str | Path, *, keyframe_source: str = "tokenizer",
                 keyframe_backbone_weights: str | None = None, template: str = "v1", max_clips: int = 8,
                 decompose: DecomposeConfig | None = None, device: str = "cpu", dtype: torch.dtype | None = None,
                 seed: int = 0, min_new_tokens: int | None = None):
        from videolavit.release.layout import read_behaviour

        self.model_dir = check_llm_directory(model_dir)
        self.vocabulary = read_llm_vocabulary(self.model_dir)
        if keyframe_source not in ("tokenizer", "none"):
            raise ValueError(f"keyframe_source must be 'tokenizer' or 'none', got {keyframe_source!r}")
        try:
            self.keyframe_input = read_keyframe_input(self.model_dir)
        except KeyframeInputError as exc:
            raise ModelDirectoryError(str(exc)) from None
        tokenizers_dir = Path(tokenizers_dir)
        keyframe_dir: Path | None = tokenizers_dir if keyframe_source == "tokenizer" else None
        motion_dir = tokenizers_dir
        if self.keyframe_input == "continuous":
            if keyframe_source == "none":
                raise ValueError(f"{self.model_dir} reads keyframes as continuous features: keyframe_source "
                                 "'none' does not fit it")
            if not (self.model_dir / "keyframe_tokenizer.json").is_file():
                raise ModelDirectoryError(f"{self.model_dir} reads keyframes as continuous features but holds no "
                                          "keyframe_tokenizer.* (its keyframe encoder; import-release writes it)")
            keyframe_dir = self.model_dir
            if (self.model_dir / "motion_tokenizer.json").is_file():
                motion_dir = self.model_dir
        self.template = template_by_name(template)
        self.decompose = decompose or DecomposeConfig(max_clips=max_clips)
        self.max_clips = max_clips
        # The tokenize job's own coder: the same clip selection and the same frozen tokenizers.
        try:
            self.codes = VideoCoder(self.vocabulary, motion_dir, keyframe_dir,
                                    keyframe_backbone_weights=keyframe_backbone_weights, device=device)
        except TokenizerExportError as exc:
            hint = " (or keyframe_source='none' for a motion-only LLM)" if keyframe_source == "tokenizer" else ""
            raise TokenizerExportError(f"{exc}{hint}") from None
        try:
            self.tokenizer = load_text_tokenizer(str(self.model_dir), self.vocabulary)
        except (OSError, ValueError) as exc:
            raise ModelDirectoryError(f"cannot load the text tokenizer in {self.model_dir}: {exc}") from None
        self.model = load_llm(self.model_dir, device=device, dtype=dtype)
        rows = self.model.get_input_embeddings().weight.shape[0]
        if rows != self.vocabulary.size:
            raise ModelDirectoryError(f"the LLM in {self.model_dir} has {rows} vocabulary rows but its "
                                      f"{VOCABULARY_FILE} says {self.vocabulary.size}")
        self.seed = seed
        if min_new_tokens is None:
            min_new_tokens = RELEASE_MIN_NEW_TOKENS if read_behaviour(self.model_dir).get("llm_generation") == \
                "release" else 0
        self.min_new_tokens = int(min_new_tokens)

    # ---- video -> ids ----------------------------------------------------------------------------
    def clip_inputs(self, video: VideoSource, name: str = "video") -> tuple[torch.Tensor | None, torch.Tensor]:
        """(keyframe images [N, 3, S, S] in [0, 1], or None without keyframes; motion fields [N, 2, T, h, w] at
        the motion tokenizer's grid and scale) of the clips of a video (path, bytes or file object)."""
        if isinstance(video, (str, os.PathLike)) and not Path(video).is_file():
            raise FileNotFoundError(f"video not found: {video}")
        try:
            decomposed = decompose_video(video, self.decompose)
            meta = decomposed.metadata()
            starts = select_clip_starts(meta["iframes"], meta["num_frames"], self.codes.clip_frames, self.max_clips)
            if not starts:
                raise errors.VideoSkip(errors.TOO_SHORT, f"{name}: no {self.codes.clip_frames}-frame clip")
            motions = self.codes.motion_clips(decomposed.motion, starts)
            images = self.codes.keyframe_images(decomposed.mp4, meta, starts) if self.codes.has_keyframes else None
        except errors.VideoSkip as skip:
            raise VideoInputError(skip.reason, skip.detail) from None
        return images, motions

    @torch.inference_mode()
    def encode_clips(self, images: torch.Tensor | None, motions: torch.Tensor
                     ) -> tuple[list[int], list[torch.Tensor] | None]:
        """(LLM ids of the clips, keyframe features or None): on the codes path ``[IMG] codes [/IMG] [MOV] ...``
        and None; on the continuous path ``[IMG] <slot> [/IMG] [MOV] ...`` and each keyframe's features
        (the slots' content). The keyframe tokenizer's Gumbel draws are seeded with ``seed``."""
        self.codes.motion_tokenizer  # noqa: B018 - loaded (their init draws random numbers) before the seeding,
        if images is not None:  # so every call draws the same keep decisions, the first one included
            self.codes.keyframe_tokenizer()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            if self.keyframe_input == "continuous":
                tokenizer = self.codes.keyframe_tokenizer()
                features = continuous_keyframe_features(tokenizer, images.to(self.codes.device))
                motion_codes = self.codes.motion_codes(motions)
                for motion in motion_codes:
                    self.vocabulary.motion_id(motion.tolist())  # raises outside [0, motion_codes)
                return continuous_clip_ids(motion_codes, self.vocabulary), features
            motion_codes = self.codes.motion_codes(motions)
            keyframes = self.codes.image_codes(images) if images is not None else None
        return self.codes.video_ids(keyframes, motion_codes), None

    def encode_video(self, video: VideoSource, name: str = "video") -> tuple[list[int], list[torch.Tensor] | None]:
        """``encode_clips`` of a video's clips (path, bytes or file object)."""
        return self.encode_clips(*self.clip_inputs(video, name))

    def video_ids(self, video: VideoSource, name: str = "video") -> list[int]:
        """LLM ids of a video (codes path): its clips' keyframe and motion blocks."""
        if self.keyframe_input == "continuous":
            raise KeyframeInputError(f"{self.model_dir} reads keyframes as features: use encode_video")
        return self.encode_video(video, name)[0]

    def prompt_ids(self, video_ids: Sequence[int], question: str) -> list[int]:
        """``bos {system} USER: <video ids>\\n{question} ASSISTANT:``."""
        question = question.replace(VIDEO_PLACEHOLDER, "").strip()
        message = Message("user", f"{VIDEO_PLACEHOLDER}\n{question}")
        return self.template.generation_prompt([message], self.tokenizer, [list(video_ids)])

    # ---- answers ---------------------------------------------------------------------------------
    def generate_ids(self, prompts: Sequence[Sequence[int]], keyframe_features: Sequence | None = None,
                     max_new_tokens: int = 64, do_sample: bool = False, temperature: float = 1.0,
                     top_p: float = 1.0) -> list[list[int]]:
        """Answer ids (eos not included) of ready prompts, decoded as one batch; ``keyframe_features``: per
        prompt the features of its keyframe slots (continuous path)."""
        return generate_text(self.model, prompts, vocabulary=self.vocabulary, eos_id=self.tokenizer.eos_token_id,
                             pad_id=self.tokenizer.pad_token_id, max_new_tokens=max_new_tokens,
                             do_sample=do_sample, temperature=temperature, top_p=top_p,
                             seed=self.seed if do_sample else None, min_new_tokens=self.min_new_tokens,
                             keyframe_features=keyframe_features)

    def answer_ids(self, prompts: Sequence[Sequence[int]], max_new_tokens: int = 64, do_sample: bool = False,
                   temperature: float = 1.0, top_p: float = 1.0,
                   keyframe_features: Sequence | None = None) -> list[str]:
        """Answers (decoded text) to ready prompts, decoded as one batch."""
        outputs = self.generate_ids(prompts, keyframe_features, max_new_tokens=max_new_tokens, do_sample=do_sample,
                                    temperature=temperature, top_p=top_p)
        return [self.tokenizer.decode(ids, skip_special_tokens=True).strip() for ids in outputs]

    def answer(self, video: VideoSource, question: str, max_new_tokens: int = 64, do_sample: bool = False,
               temperature: float = 1.0, top_p: float = 1.0) -> str:
        """The model's answer to ``question`` about ``video`` (a path, mp4 bytes or a file object)."""
        return self.answer_many(video, [question], max_new_tokens=max_new_tokens, do_sample=do_sample,
                                temperature=temperature, top_p=top_p)[0]

    def answer_many(self, video: VideoSource, questions: Sequence[str], max_new_tokens: int = 64,
                    **kwargs) -> list[str]:
        """Several questions about one video: the video is decomposed and tokenised once."""
        ids, features = self.encode_video(video)
        return self.answer_ids([self.prompt_ids(ids, q) for q in questions], max_new_tokens=max_new_tokens,
                               keyframe_features=None if features is None else [features] * len(questions),
                               **kwargs)


__all__ = ["VideoChat", "ModelDirectoryError", "TokenizerExportError", "VideoInputError",
           "generate_text", "read_llm_vocabulary", "load_llm",
           "check_llm_directory", "template_by_name", "TEMPLATES", "VOCABULARY_FILE", "RELEASE_MIN_NEW_TOKENS"]
