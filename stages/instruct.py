"""Stage 3: instruction tuning of the LLM on video (and image) conversations (paper §4; docs/design.md §8).

Stage 3 teaches the pre-trained LLM to answer questions about videos. It is stage 2's ``PretrainStage`` (the same
model, sharding, logs and Hugging Face export, so ``videolavit.inference.video_chat`` loads either) started from
the stage-2 export and fed by ``datamodules.instruct_views.InstructionSequenceView`` (an imported release SFT
model: ``datamodules.continuous_instruct_views.ContinuousInstructionView``). It adds held-out answers scored at
each validation and LLaVA-v1.5's optimiser. Start and resume, loss, answers, the continuous keyframe path and the
optimiser: docs/design.md §8 ("Stage 3", "Keyframes as codes or as features").
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_info

from stages.base import OptimizerConfig, StageModule
from stages.pretrain import PretrainStage
from videolavit.evaluation.qa_score import QAScore
from videolavit.inference.video_chat import generate_text, read_llm_vocabulary
from videolavit.llm.keyframe_features import (check_keyframe_input, continuous_keyframe_features,
                                              read_keyframe_input, splice_keyframe_features, write_llm_spec)
from videolavit.llm.sequences import IGNORE_INDEX
from videolavit.llm.vocabulary import Vocabulary

from videolavit.models.export_names import KEYFRAME_TOKENIZER

TRAINED_KEYFRAME_PARTS = ("causal_encoder", "vit_proj")  # of the continuous path's keyframe encoder
KEYFRAME_EXPORT = KEYFRAME_TOKENIZER  # the continuous path's keyframe encoder, inside the LLM export


def default_optimizer() -> OptimizerConfig:
    """LLaVA-v1.5 fine-tuning: AdamW (0.9, 0.999), eps 1e-8, lr 2e-5, weight decay 0, cosine (warm-up by ratio)."""
    return OptimizerConfig(lr=2e-5, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, warmup_steps=0)


class InstructStage(PretrainStage):
    """Args:
        init_from: the stage-2 export directory to start a new run from (HF model + tokenizer + vocabulary).
        llm_path: export directory the architecture, tokenizer and vocabulary come from (default: ``init_from``;
            needed on its own when resuming with ``--model.init_from null``).
        tokenizer_path: text tokenizer directory (default: ``llm_path``, which holds the export's tokenizer).
        vocabulary: the id layout (default: ``llm_path``'s ``videolavit_vocabulary.json``).
        qa_eval_questions: held-out questions answered at the end of each validation (0: none).
        qa_max_new_tokens: most decoding steps per answer.
        qa_batch_size: prompts decoded together.
        warmup_ratio: warm-up as a fraction of the total steps (LLaVA: 0.03); overrides ``optimizer.warmup_steps``.
        attn_implementation, activation_checkpointing, fsdp_param_dtype, fsdp_reshard_after_forward, load_dtype,
        export_dtype, optimizer, export_dir, max_nonfinite_steps, chat_template: as ``PretrainStage`` (set
            ``chat_template`` to the data's ``template``).
        keyframe_input: ``"codes"`` | ``"continuous"`` (docs/design.md §8); None: what ``llm_path`` records.
        max_sequence_length: rows on the continuous path are cut to this many positions after the keyframe
            features are spliced in (the release's ``tokenizer_model_max_length``).
    """

    def __init__(self, init_from: str | None = None, llm_path: str | None = None, tokenizer_path: str | None = None,
                 vocabulary: Vocabulary | None = None, qa_eval_questions: int = 64, qa_max_new_tokens: int = 16,
                 qa_batch_size: int = 16, warmup_ratio: float | None = 0.03, attn_implementation: str = "sdpa",
                 activation_checkpointing: bool = False, fsdp_param_dtype: str | None = None,
                 fsdp_reshard_after_forward: bool = True, load_dtype: str = "float32",
                 export_dtype: str | None = None, optimizer: OptimizerConfig | None = None,
                 export_dir: str | None = None, max_nonfinite_steps: int = 20, chat_template: str = "v1",
                 keyframe_input: str | None = None, max_sequence_length: int = 2048):
        llm_path = llm_path or init_from
        if llm_path is None:
            raise ValueError("InstructStage needs init_from (the stage-2 export directory); to resume with "
                             "--model.init_from null, set model.llm_path to that directory")
        if not Path(llm_path).is_dir():
            raise FileNotFoundError(f"LLM directory {llm_path} does not exist (the stage-2 export_dir; weights "
                                    "load from local files only)")
        vocabulary = vocabulary or read_llm_vocabulary(llm_path)
        super().__init__(tokenizer_path=tokenizer_path or llm_path, vocabulary=vocabulary, llm_path=llm_path,
                         attn_implementation=attn_implementation, activation_checkpointing=activation_checkpointing,
                         fsdp_param_dtype=fsdp_param_dtype, fsdp_reshard_after_forward=fsdp_reshard_after_forward,
                         load_dtype=load_dtype, export_dtype=export_dtype,
                         optimizer=optimizer or default_optimizer(), init_from=init_from, export_dir=export_dir,
                         max_nonfinite_steps=max_nonfinite_steps, chat_template=chat_template)
        self.save_hyperparameters()
        # from_pretrained returns a model in eval mode and Lightning keeps module modes as they are: without
        # this the decoder layers would skip activation checkpointing (it only runs in training mode).
        self.llm.train()
        self.llm_path = llm_path
        if warmup_ratio is not None and not 0.0 <= warmup_ratio < 1.0:
            raise ValueError(f"warmup_ratio must lie in [0, 1), got {warmup_ratio}")
        self.warmup_ratio = warmup_ratio
        self.qa_eval_questions, self.qa_max_new_tokens = int(qa_eval_questions), int(qa_max_new_tokens)
        self.qa_batch_size = max(1, int(qa_batch_size))
        self._val_questions: list[dict] = []
        self.last_qa: dict = {}  # summary and answers of the latest QA evaluation (for scripts and tests)
        self.keyframe_input = check_keyframe_input(keyframe_input or read_keyframe_input(llm_path))
        self.max_sequence_length = int(max_sequence_length)
        self.keyframe_encoder = self._keyframe_encoder(llm_path) if self.keyframe_input == "continuous" else None

    # ---- the continuous keyframe path ------------------------------------------------------------
    def _keyframe_encoder(self, directory: str):
        from videolavit.models.keyframe_tokenizer_export import load_keyframe_tokenizer

        if not (Path(directory) / f"{KEYFRAME_EXPORT}.json").is_file():
            raise FileNotFoundError(f"keyframe_input 'continuous' needs the keyframe encoder {KEYFRAME_EXPORT}.* in "
                                    f"{directory} (import-release writes it into the SFT export)")
        encoder = load_keyframe_tokenizer(directory).requires_grad_(False)
        width = self.llm.config.hidden_size
        if encoder.config.llm_dim != width:
            raise ValueError(f"the keyframe encoder in {directory} projects to {encoder.config.llm_dim}, the LLM's "
                             f"width is {width}")
        for part in TRAINED_KEYFRAME_PARTS:
            getattr(encoder, part).requires_grad_(True)
        return encoder.train()

    def frozen_prefixes(self) -> tuple[str, ...]:
        if self.keyframe_encoder is None:
            return super().frozen_prefixes()
        trained = tuple(f"keyframe_encoder.{p}." for p in TRAINED_KEYFRAME_PARTS)
        return (*super().frozen_prefixes(), *sorted({f"keyframe_encoder.{n.split('.')[0]}."
                                                     for n in self.keyframe_encoder.state_dict()} - set(trained)))

    def keyframe_features(self, images: torch.Tensor, counts: torch.Tensor) -> list[list[torch.Tensor]]:
        """Per row the features of its keyframes (``counts[row]`` of the batch's ``images``, in order)."""
        features = continuous_keyframe_features(self.keyframe_encoder, images)
        out, start = [], 0
        for n in counts.tolist():
            out.append(features[start:start + n])
            start += n
        return out

    def continuous_inputs(self, batch: dict) -> dict:
        """``splice_keyframe_features`` of a ``ContinuousInstructionView`` batch (right padding, cut to
        ``max_sequence_length``)."""
        features = self.keyframe_features(batch["keyframe_images"], batch["keyframe_counts"])
        rows, labels = [], []
        for ids, targets, n in zip(batch["input_ids"].tolist(), batch["labels"].tolist(),
                                   batch["row_lengths"].tolist()):
            rows.append(ids[:n])
            labels.append(targets[:n])
        return splice_keyframe_features(self.llm.get_input_embeddings(), rows, features, labels,
                                        padding_side="right", max_length=self.max_sequence_length)

    def token_losses(self, batch: dict):
        if self.keyframe_encoder is None:
            return super().token_losses(batch)
        inputs = self.continuous_inputs(batch)
        logits = self.llm(inputs_embeds=inputs["inputs_embeds"], attention_mask=inputs["attention_mask"],
                          position_ids=inputs["position_ids"], use_cache=False).logits[:, :-1]
        targets = inputs["labels"][:, 1:]
        ce = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX,
                             reduction="none").view_as(targets)
        modality = self.vocabulary.modality_of(targets.clamp(min=0).cpu()).to(targets.device)
        return ce, targets != IGNORE_INDEX, modality

    def model_flops(self, batch: dict, training: bool = True) -> float:
        if self.keyframe_encoder is None:
            return super().model_flops(batch, training)
        from videolavit.llm.flops import training_flops_per_token

        rows, seq_len = batch["input_ids"].shape  # LLM only; keyframe features add rows the ids do not show
        flops = training_flops_per_token(self.llm.config, seq_len) * rows * seq_len
        return flops if training else flops / 3

    def on_after_backward(self) -> None:
        """The replicated keyframe encoder's gradients, averaged over the data-parallel ranks."""
        if self.keyframe_encoder is None or not (torch.distributed.is_available()
                                                 and torch.distributed.is_initialized()):
            return
        world = torch.distributed.get_world_size()
        if world == 1:
            return
        for part in TRAINED_KEYFRAME_PARTS:
            for param in getattr(self.keyframe_encoder, part).parameters():
                if param.grad is None:
                    param.grad = torch.zeros_like(param)
                torch.distributed.all_reduce(param.grad)
                param.grad.div_(world)

    # ---- start -----------------------------------------------------------------------------------
    def load_init_from(self, directory: str) -> None:
        """The stage-2 export; already in place when it is ``llm_path`` (loaded at construction)."""
        if Path(directory).resolve() == Path(self.llm_path).resolve():
            rank_zero_info(f"InstructStage: the LLM was loaded from {directory} at construction")
            return
        super().load_init_from(directory)
        if self.keyframe_encoder is not None:
            trained = self._keyframe_encoder(directory).state_dict()
            own = self.keyframe_encoder.state_dict()
            with torch.no_grad():
                for name, value in trained.items():
                    if name.split(".")[0] in TRAINED_KEYFRAME_PARTS:
                        own[name].copy_(value)

    def configure_optimizers(self):
        cfg = self.optimizer_config
        if self.warmup_ratio is not None:
            cfg.warmup_steps = int(round(self.warmup_ratio * self._total_steps()))
        # All parameters at one rate (LLaVA): the new-row learning-rate check of stage 2 does not apply.
        return StageModule.configure_optimizers(self)

    # ---- validation: loss (stage 2) + answers ----------------------------------------------------
    def on_validation_epoch_start(self) -> None:
        super().on_validation_epoch_start()
        self._val_questions = []

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        super().validation_step(batch, batch_idx)
        self._val_questions.extend(batch.get("questions", []))

    def on_validation_epoch_end(self) -> None:
        super().on_validation_epoch_end()
        if self.qa_eval_questions <= 0 or (self._trainer is not None and self.trainer.sanity_checking):
            return
        questions = self._held_out_questions()
        if not questions:
            return
        score, answers = self.answer_questions(questions)
        metrics = {"val/qa_accuracy": score.accuracy}
        metrics.update({f"val/qa_accuracy_{name}": acc for name, acc in score.attribute_accuracy().items()})
        metrics["val/qa_questions"] = float(score.total)
        self.log_dict({k: torch.tensor(float(v)) for k, v in metrics.items()})
        self.last_qa = {"summary": score.summary(), "answers": answers}
        self._log_answers(answers)

    def _held_out_questions(self) -> list[dict]:
        """The first ``qa_eval_questions`` questions by id over all ranks; the same list on every rank."""
        mine = self._val_questions
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            gathered: list = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(gathered, mine)
            mine = [q for part in gathered for q in part]
        unique = {q["id"]: q for q in mine}
        return [unique[k] for k in sorted(unique)][: self.qa_eval_questions]

    @torch.no_grad()
    def answer_questions(self, questions: list[dict]) -> tuple[QAScore, list[dict]]:
        """Greedy answers (text ids only) to prompt-ready questions, and their exact-match score."""
        was_training = self.llm.training
        self.llm.eval()
        score, answers = QAScore(), []
        tok = self.tokenizer
        for start in range(0, len(questions), self.qa_batch_size):
            chunk = questions[start:start + self.qa_batch_size]
            features = None
            if self.keyframe_encoder is not None:
                with torch.random.fork_rng(devices=[]):  # the selector's Gumbel draws: the same every validation
                    torch.manual_seed(0)
                    features = [continuous_keyframe_features(self.keyframe_encoder,
                                                             q["keyframe_images"].to(self.device)) for q in chunk]
            outputs = generate_text(self.llm, [q["prompt_ids"] for q in chunk], vocabulary=self.vocabulary,
                                    eos_id=tok.eos_token_id, pad_id=tok.pad_token_id,
                                    max_new_tokens=self.qa_max_new_tokens, keyframe_features=features)
            for q, ids in zip(chunk, outputs):
                pred = tok.decode(ids, skip_special_tokens=True).strip()
                hit = score.update(pred, q["answer"], q.get("attribute"))
                answers.append({"id": q["id"], "question": q["question"], "answer": q["answer"], "pred": pred,
                                "attribute": q.get("attribute"), "correct": hit})
        self.llm.train(was_training)
        return score, answers

    # ---- export ----------------------------------------------------------------------------------
    def export(self, directory, **kwargs) -> None:
        super().export(directory, **kwargs)
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        if self.keyframe_encoder is None or rank != 0:
            return
        import shutil

        from videolavit.models.keyframe_tokenizer_export import (BackboneSource, read_keyframe_tokenizer,
                                                                 save_keyframe_tokenizer)

        directory = Path(directory)
        recorded = read_keyframe_tokenizer(self.llm_path, KEYFRAME_EXPORT)[2]
        backbone = BackboneSource(weights=recorded.get("weights"), weights_prefix=recorded.get("weights_prefix", ""),
                                  random_init_seed=recorded.get("random_init_seed"),
                                  fingerprint=recorded["fingerprint"])
        encoder = self.keyframe_encoder
        save_keyframe_tokenizer(encoder, directory, backbone, name=KEYFRAME_EXPORT)
        for suffix in (".json", ".safetensors"):
            source = Path(self.llm_path) / f"motion_tokenizer{suffix}"
            if source.is_file() and source.resolve() != (directory / source.name).resolve():
                shutil.copy(source, directory / source.name)
        write_llm_spec(directory, "continuous", keyframe_encoder=f"trained from {self.llm_path}")

    def _log_answers(self, answers: list[dict], count: int = 12) -> None:
        logger = self.logger if self._trainer is not None else None
        experiment = getattr(logger, "experiment", None)
        if experiment is None or not hasattr(experiment, "add_text") or self.global_rank != 0:
            return
        lines = [f"| {a['id']} | {a['question']} | {a['answer']} | {a['pred']} |" for a in answers[:count]]
        experiment.add_text("val/qa_answers", "| id | question | answer | prediction |\n|---|---|---|---|\n"
                            + "\n".join(lines), global_step=self.global_step)
