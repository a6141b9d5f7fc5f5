"""Stage 3: instruction tuning of the LLM on video (and image) conversations (paper §4; docs/design.md §8).

The stage is stage 2's ``PretrainStage`` - the same ``LlamaForCausalLM`` with split vocabulary rows,
FSDP2 via ``ModelParallelStrategy.configure_model``, activation checkpointing, per-modality logs and the
same Hugging Face export (so ``videolavit.inference.video_chat`` loads either) - started from the stage-2
export and fed by ``datamodules.instruct_views.InstructionSequenceView``:

* **Start.** ``init_from`` is the stage-2 export directory (LLM weights, tokenizer, vocabulary JSON),
  loaded with transformers from the local directory. The architecture, tokenizer and id layout come from
  ``llm_path`` (default: ``init_from``). Resuming is ``--ckpt_path last --model.init_from null`` (the CLI
  refuses both); the config keeps ``llm_path`` set so the model can be built without ``init_from``.
* **Loss.** Next-token cross-entropy where ``labels != -100``: the view labels the assistant turns (and
  their closing eos) only, so system prompt, user turns and the video tokens carry no loss.
  ``train/loss`` and ``val/loss`` (token-weighted over all ranks) as in stage 2.
* **Answers.** At the end of each validation (not the sanity check), the first ``qa_eval_questions``
  held-out questions (sorted by id, gathered from all ranks) are answered greedily with text ids only
  (``generate_text``) and scored by exact match after normalisation (``QAScore``): ``val/qa_accuracy``
  and, when the annotations name attributes, ``val/qa_accuracy_<attribute>``. Every rank decodes the same
  prompts with ``generate(synced_gpus=True)`` when several ranks run - under FSDP2 a rank that stopped
  early would leave the others waiting in an all-gather - and rank 0's logger records it. 0 disables it.
* **Optimiser.** LLaVA-v1.5 (``default_optimizer``): AdamW lr 2e-5 for every parameter (the new vocabulary
  rows included: no ``extra_lr``), betas (0.9, 0.999), eps 1e-8, weight decay 0, cosine to 0 with
  ``warmup_ratio`` (3%) of the steps as linear warm-up.
"""

from __future__ import annotations

from pathlib import Path

import torch
from lightning.pytorch.utilities import rank_zero_info

from stages.base import OptimizerConfig, StageModule
from stages.pretrain import PretrainStage
from videolavit.inference.video_chat import QAScore, generate_text, read_llm_vocabulary
from videolavit.llm.vocabulary import Vocabulary


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
    """

    def __init__(self, init_from: str | None = None, llm_path: str | None = None, tokenizer_path: str | None = None,
                 vocabulary: Vocabulary | None = None, qa_eval_questions: int = 64, qa_max_new_tokens: int = 16,
                 qa_batch_size: int = 16, warmup_ratio: float | None = 0.03, attn_implementation: str = "sdpa",
                 activation_checkpointing: bool = False, fsdp_param_dtype: str | None = None,
                 fsdp_reshard_after_forward: bool = True, load_dtype: str = "float32",
                 export_dtype: str | None = None, optimizer: OptimizerConfig | None = None,
                 export_dir: str | None = None, max_nonfinite_steps: int = 20, chat_template: str = "v1"):
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

    # ---- start -----------------------------------------------------------------------------------
    def load_init_from(self, directory: str) -> None:
        """The stage-2 export; already in place when it is ``llm_path`` (loaded at construction)."""
        if Path(directory).resolve() == Path(self.llm_path).resolve():
            rank_zero_info(f"InstructStage: the LLM was loaded from {directory} at construction")
            return
        super().load_init_from(directory)

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
            outputs = generate_text(self.llm, [q["prompt_ids"] for q in chunk], vocabulary=self.vocabulary,
                                    eos_id=tok.eos_token_id, pad_id=tok.pad_token_id,
                                    max_new_tokens=self.qa_max_new_tokens)
            for q, ids in zip(chunk, outputs):
                pred = tok.decode(ids, skip_special_tokens=True).strip()
                hit = score.update(pred, q["answer"], q.get("attribute"))
                answers.append({"id": q["id"], "question": q["question"], "answer": q["answer"], "pred": pred,
                                "attribute": q.get("attribute"), "correct": hit})
        self.llm.train(was_training)
        return score, answers

    def _log_answers(self, answers: list[dict], count: int = 12) -> None:
        logger = self.logger if self._trainer is not None else None
        experiment = getattr(logger, "experiment", None)
        if experiment is None or not hasattr(experiment, "add_text") or self.global_rank != 0:
            return
        lines = [f"| {a['id']} | {a['question']} | {a['answer']} | {a['pred']} |" for a in answers[:count]]
        experiment.add_text("val/qa_answers", "| id | question | answer | prediction |\n|---|---|---|---|\n"
                            + "\n".join(lines), global_step=self.global_step)
