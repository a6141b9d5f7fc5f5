"""Stage 2: unified generative pre-training of the LLM (paper §3.3, A.2; DESIGN §8, §10).

A ``LlamaForCausalLM`` - Llama-2-7B from a local Hugging Face directory (``llm_path``), or a
``LlamaConfig`` built on the fly (``llm_config``, tiny runs) - learns next-token prediction over packed
rows of video-text pairs (both orders) and text-only documents (``datamodules.llm_views``). The id
layout is ``Vocabulary`` (release: 49412 ids); the embedding matrix and ``lm_head`` are resized to it at
construction (transformers 5: before the optimizer exists).

**Learning rates.** The paper uses 2e-5 for the LLM and 5e-5 for "other" parameters. AdamW's update does
not depend on the gradient's scale, so a per-row learning rate cannot be had by scaling gradients, and
one tensor belongs to one parameter group. The stage therefore splits the vocabulary rows of both the
input embedding and ``lm_head`` into two parameters (``SplitEmbedding`` / ``SplitLMHead``):

* ``llm.model.embed_tokens.base`` / ``llm.lm_head.base``: rows ``[0, text_size)``, the pretrained text vocabulary;
* ``llm.model.embed_tokens.new``  / ``llm.lm_head.new`` : rows ``[text_size, size)``, the new
  ``[IMG]``/``[/IMG]``/keyframe/``[MOV]``/``[/MOV]``/motion rows (``NEW_ROW_PARAMETERS``),

concatenated inside ``forward``. ``optimizer.extra_lr`` maps those two prefixes to 5e-5 (the default
``optimizer`` does; a YAML that overrides ``optimizer`` must list them, see experiments/stage2_pretrain.yaml);
everything else runs at ``optimizer.lr`` = 2e-5. The export joins the rows again, so the exported
directory is a plain ``LlamaForCausalLM`` checkpoint. New rows start as in ``resize_token_embeddings``
(mean of the old rows plus small noise); in a model built from a config all rows are random.

**Loss and logs.** ``forward`` gets ``input_ids`` + ``position_ids`` with ``use_cache=False`` and no 2-D
attention mask (packed documents stay separate, see ``videolavit.llm.sequences``). Loss = token-mean
next-token cross-entropy over the labels (-100 ignored). Logged: ``train/loss``, per target modality
``train/loss_text`` / ``train/loss_keyframe`` / ``train/loss_motion`` / ``train/loss_special`` (the four block
markers), ``train/padding_fraction``, ``train/tokens_per_s`` (all ranks, padding included, wall time
between consecutive batches), ``train/model_tflops_per_s`` and, on GPUs, ``train/mfu`` (``videolavit.llm.flops``); on validation the token-weighted ``val/loss`` and ``val/loss_<modality>``
summed over all ranks.

**Scale.** With Lightning's ``ModelParallelStrategy`` (it sets ``self.device_mesh``) ``configure_model``
applies FSDP2 ``fully_shard`` to every decoder layer and then to the whole LLM over the
``data_parallel`` mesh dimension (tensor parallelism is not implemented: ``tensor_parallel_size`` must be
1), optionally with a bf16 parameter ``MixedPrecisionPolicy``. Activation checkpointing (non-reentrant)
is the decoder layers' own (``gradient_checkpointing_enable``). Under FSDP2 every rank must run the same
number of forward passes: give every rank the same number of validation batches (``limit_val_batches``).

**Export** (``export_dir``, at the end of ``fit``; or ``export(dir)``): ``save_pretrained`` of the model
(full state dict gathered from the shards first) and the tokenizer, plus ``videolavit_vocabulary.json``;
``transformers.AutoModelForCausalLM.from_pretrained(dir, dtype="auto")`` loads it as is (``use_cache`` back
on; without ``dtype`` transformers 4.x upcasts to float32).
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from stages.base import OptimizerConfig, StageModule
from videolavit.llm.flops import model_flops_utilisation, training_flops_per_token
from videolavit.llm.sequences import IGNORE_INDEX, PAD_DOCUMENT_ID
from videolavit.llm.text_tokenizer import build_tiny_tokenizer, load_text_tokenizer
from videolavit.llm.vocabulary import Modality, Vocabulary

EXPORT_NAME = "llm"
VOCABULARY_FILE = "videolavit_vocabulary.json"
NEW_ROW_PARAMETERS = ("llm.model.embed_tokens.new", "llm.lm_head.new")
MODALITY_NAMES = {Modality.TEXT: "text", Modality.KEYFRAME: "keyframe", Modality.MOTION: "motion",
                  Modality.SPECIAL: "special"}


def default_optimizer() -> OptimizerConfig:
    """Paper Table 6 (pre-training): AdamW (0.9, 0.95), eps 1e-6, wd 0.1, 2k warm-up, cosine; lr 2e-5 for the
    LLM and 5e-5 for the new vocabulary rows."""
    return OptimizerConfig(lr=2e-5, betas=(0.9, 0.95), eps=1e-6, weight_decay=0.1, warmup_steps=2000,
                           extra_lr={name: 5e-5 for name in NEW_ROW_PARAMETERS})


@dataclass
class TokenizerBuild:
    """Build a tiny byte-level BPE tokenizer into ``tokenizer_path`` when that directory is missing.

    For tiny CPU runs only (a real run points ``tokenizer_path`` at Llama-2's tokenizer). Trained on the
    captions of ``shards`` plus the lines of ``text_files``, with exactly ``vocabulary.text_size`` ids.
    Built once: into a temporary directory renamed into place, so concurrent ranks never see half a
    tokenizer, and a later run (or resume) loads the same one.
    """

    shards: str | list[str] | None = None
    text_files: list[str] = field(default_factory=list)


def _dtype(name: str | None) -> torch.dtype | None:
    if name is None:
        return None
    dtype = getattr(torch, str(name).replace("torch.", ""), None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype {name!r}")
    return dtype


# -------------------------------------------------------------------------------- split vocabulary rows
class SplitEmbedding(nn.Module):
    """An input embedding whose rows ``[0, split)`` (``base``) and ``[split, n)`` (``new``) are separate
    parameters, so that they can have their own learning rates."""

    def __init__(self, weight: torch.Tensor, split: int):
        super().__init__()
        self.base = nn.Parameter(weight[:split].detach().clone())
        self.new = nn.Parameter(weight[split:].detach().clone())

    @property
    def weight(self) -> torch.Tensor:
        return torch.cat([self.base, self.new])

    @property
    def num_embeddings(self) -> int:
        return self.base.shape[0] + self.new.shape[0]

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.weight)


class SplitLMHead(nn.Module):
    """``lm_head`` (no bias) with the same row split as ``SplitEmbedding``."""

    def __init__(self, weight: torch.Tensor, split: int):
        super().__init__()
        self.base = nn.Parameter(weight[:split].detach().clone())
        self.new = nn.Parameter(weight[split:].detach().clone())

    @property
    def weight(self) -> torch.Tensor:
        return torch.cat([self.base, self.new])

    @property
    def out_features(self) -> int:
        return self.base.shape[0] + self.new.shape[0]

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return F.linear(hidden, self.weight)


def split_vocabulary_rows(llm: LlamaForCausalLM, split: int) -> None:
    """Replace ``embed_tokens`` and ``lm_head`` of ``llm`` by their split versions (weights unchanged)."""
    if getattr(llm.config, "tie_word_embeddings", False):
        raise ValueError("tied input/output embeddings are not supported: the stage trains embed_tokens and "
                         "lm_head as separate matrices (Llama-2 does not tie them; set tie_word_embeddings: false)")
    embed, head = llm.model.embed_tokens, llm.lm_head
    if getattr(head, "bias", None) is not None:
        raise ValueError("lm_head with a bias is not supported")
    llm.model.embed_tokens = SplitEmbedding(embed.weight, split)
    llm.lm_head = SplitLMHead(head.weight, split)


def join_vocabulary_rows(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A split state dict (``*.base`` / ``*.new``) -> the plain ``LlamaForCausalLM`` layout (``*.weight``)."""
    out = {}
    for prefix in ("model.embed_tokens", "lm_head"):
        out[f"{prefix}.weight"] = torch.cat([state[f"{prefix}.base"], state[f"{prefix}.new"]])
    out.update({k: v for k, v in state.items()
                if not k.startswith(("model.embed_tokens.", "lm_head."))})
    return out


# -------------------------------------------------------------------------------- the stage
class PretrainStage(StageModule):
    """Args:
        tokenizer_path: local directory of the text tokenizer (``vocabulary.text_size`` ids).
        vocabulary: the id layout (release: text 32000, keyframe 16384, motion 1024 -> 49412 ids).
        llm_path: local Hugging Face directory of the initial LLM (e.g. Llama-2-7B); no downloads.
        llm_config: ``LlamaConfig`` keyword arguments for a freshly initialised LLM (tiny runs);
            ``vocab_size`` is set to ``vocabulary.size``. Exactly one of ``llm_path`` / ``llm_config``.
        build_tokenizer_if_missing: build a tiny tokenizer into ``tokenizer_path`` if it does not exist
            (``TokenizerBuild``; tiny runs). None: the directory must exist.
        attn_implementation: ``sdpa`` (default) or ``eager``; both honour packed position ids.
        activation_checkpointing: recompute each decoder layer in the backward pass.
        fsdp_param_dtype: FSDP2 ``MixedPrecisionPolicy`` parameter dtype (e.g. ``bfloat16``: all-gathers and
            compute in bf16, gradients reduced in fp32); None: no policy (the trainer's precision applies).
        fsdp_reshard_after_forward: FSDP2 ``reshard_after_forward`` (ZeRO-3 when true).
        load_dtype: dtype ``llm_path`` is loaded in (the master weights; float32 for bf16-mixed).
        export_dtype: dtype of the exported weights (None: as trained).
        optimizer: AdamW + cosine (``default_optimizer()``: paper Table 6, new vocabulary rows at 5e-5).
        init_from: a previous pre-training export (HF directory) to start a new run from.
        export_dir: where ``fit`` writes the Hugging Face export at the end.
    """

    export_name = EXPORT_NAME

    def __init__(self, tokenizer_path: str, vocabulary: Vocabulary | None = None, llm_path: str | None = None,
                 llm_config: dict | None = None, build_tokenizer_if_missing: TokenizerBuild | None = None,
                 attn_implementation: str = "sdpa", activation_checkpointing: bool = False,
                 fsdp_param_dtype: str | None = None, fsdp_reshard_after_forward: bool = True,
                 load_dtype: str = "float32", export_dtype: str | None = None,
                 optimizer: OptimizerConfig | None = None, init_from: str | None = None,
                 export_dir: str | None = None):
        super().__init__(optimizer=optimizer or default_optimizer(), init_from=init_from, export_dir=export_dir)
        self.save_hyperparameters()
        self.vocabulary = vocabulary or Vocabulary.release()
        self.tokenizer_path = tokenizer_path
        self.fsdp_param_dtype, self.fsdp_reshard_after_forward = fsdp_param_dtype, fsdp_reshard_after_forward
        self.export_dtype = export_dtype
        if build_tokenizer_if_missing is not None and not Path(tokenizer_path).is_dir():
            self._build_tokenizer(build_tokenizer_if_missing)
        self.tokenizer = load_text_tokenizer(tokenizer_path, self.vocabulary)
        self.llm = self._build_llm(llm_path, llm_config, attn_implementation, _dtype(load_dtype))
        if activation_checkpointing:
            self.llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self._val_sums = torch.zeros(len(MODALITY_NAMES) + 1, 2, dtype=torch.float64)  # loss sum, targets
        self._clock: float | None = None

    # ---- construction ----------------------------------------------------------------------------
    def _build_tokenizer(self, build: TokenizerBuild) -> None:
        from datamodules.llm_views import captions_of_shards, read_text_lines

        if build.shards is None and not build.text_files:
            raise ValueError("build_tokenizer_if_missing needs shards and/or text_files to learn from")
        texts = list(captions_of_shards(build.shards)) if build.shards is not None else []
        for path in build.text_files:
            texts += list(read_text_lines(path))
        if not texts:
            raise ValueError(f"no text to build a tokenizer from in {build}")
        target = Path(self.tokenizer_path)
        target.parent.mkdir(parents=True, exist_ok=True)
        scratch = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
        build_tiny_tokenizer(scratch, texts, vocab_size=self.vocabulary.text_size)
        try:
            os.rename(scratch, target)
        except OSError:  # another process built it first
            shutil.rmtree(scratch, ignore_errors=True)
            if not target.is_dir():
                raise

    def _build_llm(self, llm_path: str | None, llm_config: dict | None, attn: str,
                   load_dtype: torch.dtype | None) -> LlamaForCausalLM:
        vocab = self.vocabulary
        if (llm_path is None) == (llm_config is None):
            raise ValueError("PretrainStage: set exactly one of llm_path (a local HF directory) and llm_config")
        if llm_path is not None:
            if not Path(llm_path).is_dir():
                raise FileNotFoundError(f"LLM directory {llm_path} does not exist (weights load from local files only)")
            llm = LlamaForCausalLM.from_pretrained(llm_path, local_files_only=True, dtype=load_dtype,
                                                   attn_implementation=attn)
            llm.train()  # from_pretrained returns eval mode; Lightning keeps it, and checkpointing needs train mode
        else:
            config = dict(llm_config)
            if config.setdefault("vocab_size", vocab.size) != vocab.size:
                raise ValueError(f"llm_config.vocab_size={config['vocab_size']} but the vocabulary has "
                                 f"{vocab.size} ids")
            config.setdefault("tie_word_embeddings", False)
            llm = LlamaForCausalLM(LlamaConfig(**config))
            llm.set_attn_implementation(attn)
        rows = llm.get_input_embeddings().weight.shape[0]
        if rows != vocab.size:
            if rows != vocab.text_size:
                raise ValueError(f"the LLM has {rows} vocabulary rows; expected the text vocabulary "
                                 f"({vocab.text_size}) or the full layout ({vocab.size})")
            llm.resize_token_embeddings(vocab.size, mean_resizing=True)
        llm.config.vocab_size = vocab.size
        llm.config.use_cache = False  # a KV cache switches off packed-document masking (see sequences)
        split_vocabulary_rows(llm, vocab.text_size)
        return llm

    def load_init_from(self, directory: str) -> None:
        """Start from a previous pre-training export (a HF directory of this layout)."""
        source = LlamaForCausalLM.from_pretrained(directory, local_files_only=True, dtype=torch.float32)
        state = source.state_dict()
        rows = state["model.embed_tokens.weight"].shape[0]
        if rows != self.vocabulary.size:
            raise ValueError(f"{directory} has {rows} vocabulary rows, the layout has {self.vocabulary.size}")
        split = self.vocabulary.text_size
        for prefix in ("model.embed_tokens", "lm_head"):
            weight = state.pop(f"{prefix}.weight")
            state[f"{prefix}.base"], state[f"{prefix}.new"] = weight[:split], weight[split:]
        self.llm.load_state_dict(state, strict=True)

    def setup(self, stage: str) -> None:
        super().setup(stage)
        view = getattr(getattr(self.trainer, "datamodule", None), "view", None) if self.trainer else None
        vocabulary = getattr(view, "vocabulary", None)
        if vocabulary is not None and vocabulary != self.vocabulary:
            raise ValueError(f"the data view's vocabulary {vocabulary} differs from the stage's {self.vocabulary}")
        path = getattr(view, "tokenizer_path", None)
        if path is not None and Path(path).resolve() != Path(self.tokenizer_path).resolve():
            raise ValueError(f"the data view tokenizes with {path} but the stage's tokenizer is {self.tokenizer_path}")

    def configure_optimizers(self):
        covered = [name for name in NEW_ROW_PARAMETERS
                   if any(name.startswith(prefix) for prefix in self.optimizer_config.extra_lr)]
        if len(covered) != len(NEW_ROW_PARAMETERS):
            rank_zero_warn(f"optimizer.extra_lr does not name {sorted(set(NEW_ROW_PARAMETERS) - set(covered))}: "
                           f"those new vocabulary rows train at the LLM's lr {self.optimizer_config.lr} "
                           "(the paper uses 5e-5 for them, 2e-5 for the LLM)")
        return super().configure_optimizers()

    # ---- FSDP2 -----------------------------------------------------------------------------------
    def configure_model(self) -> None:
        """FSDP2 per decoder layer, then the root, when the strategy provides a device mesh."""
        mesh = self.device_mesh
        if mesh is None:
            return
        from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

        if isinstance(self.llm, FSDPModule):
            return  # configure_model runs again for validate/test after fit
        if "tensor_parallel" in (mesh.mesh_dim_names or ()) and mesh["tensor_parallel"].size() != 1:
            raise NotImplementedError("PretrainStage shards data-parallel only: set tensor_parallel_size: 1")
        dp_mesh = mesh["data_parallel"] if "data_parallel" in (mesh.mesh_dim_names or ()) else mesh
        kwargs: dict = {"mesh": dp_mesh, "reshard_after_forward": self.fsdp_reshard_after_forward}
        if self.fsdp_param_dtype is not None:
            kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=_dtype(self.fsdp_param_dtype),
                                                       reduce_dtype=torch.float32)
        for layer in self.llm.model.layers:
            fully_shard(layer, **kwargs)
        fully_shard(self.llm, **kwargs)

    # ---- loss ------------------------------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        """Logits [B, L, V] of packed rows (no attention mask, no cache: documents stay separate)."""
        return self.llm(input_ids=input_ids, position_ids=position_ids, use_cache=False).logits

    def token_losses(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-target cross-entropy [B, L-1] (0 where ignored), the target mask and the targets' modality."""
        logits = self(batch["input_ids"], batch["position_ids"])[:, :-1]
        targets = batch["labels"][:, 1:]
        modality = batch.get("modality")
        if modality is None:
            modality = self.vocabulary.modality_of(batch["input_ids"].cpu()).to(targets.device)
        ce = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX,
                             reduction="none").view_as(targets)
        return ce, targets != IGNORE_INDEX, modality[:, 1:]

    def _per_modality(self, ce: torch.Tensor, valid: torch.Tensor, modality: torch.Tensor) -> Iterator:
        for value, name in MODALITY_NAMES.items():
            mask = valid & (modality == int(value))
            yield name, (ce * mask).sum(), mask.sum()

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        ce, valid, modality = self.token_losses(batch)
        count = valid.sum()
        loss = ce.sum() / count.clamp_min(1)
        rows = batch["input_ids"].shape[0]
        self.log("train/loss", loss, prog_bar=True, batch_size=rows)
        with torch.no_grad():
            for name, total, n in self._per_modality(ce.detach(), valid, modality):
                if int(n) > 0:
                    self.log(f"train/loss_{name}", total / n, batch_size=rows)
            if "document_ids" in batch:
                self.log("train/padding_fraction", (batch["document_ids"] == PAD_DOCUMENT_ID).float().mean(),
                         batch_size=rows)
        return loss

    def on_train_batch_start(self, batch, batch_idx: int) -> None:
        if self._clock is None:
            self._clock = time.perf_counter()

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        now = time.perf_counter()
        elapsed, self._clock = now - self._clock, now
        world = self.trainer.world_size if self._trainer is not None else 1
        rows, seq_len = batch["input_ids"].shape
        tokens_per_s = rows * seq_len * world / max(elapsed, 1e-9)
        flops = training_flops_per_token(self.llm.config, seq_len) * tokens_per_s
        self.log_dict({"train/tokens_per_s": tokens_per_s, "train/model_tflops_per_s": flops / 1e12},
                      batch_size=rows)
        mfu = model_flops_utilisation(tokens_per_s, training_flops_per_token(self.llm.config, seq_len),
                                      self._peak_flops(world))
        if mfu is not None:
            self.log("train/mfu", mfu, batch_size=rows)

    def _peak_flops(self, world: int) -> float | None:
        """All devices' peak FLOP/s for the training precision (Lightning's table; None on CPU)."""
        if self.device.type != "cuda":
            return None
        from lightning.fabric.utilities.throughput import get_available_flops

        precision = str(self.trainer.precision) if self._trainer is not None else "32"
        dtype = torch.bfloat16 if "bf16" in precision or self.fsdp_param_dtype == "bfloat16" else torch.float32
        per_device = get_available_flops(self.device, dtype)
        return per_device * world if per_device else None

    def on_validation_epoch_start(self) -> None:
        self._val_sums = torch.zeros_like(self._val_sums)

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        ce, valid, modality = self.token_losses(batch)
        sums = [(ce.sum(), valid.sum())] + [(t, n) for _, t, n in self._per_modality(ce, valid, modality)]
        self._val_sums += torch.stack([torch.stack([t.double(), n.double()]) for t, n in sums]).cpu()

    def on_validation_epoch_end(self) -> None:
        sums = self._val_sums.to(self.device)
        if self._trainer is not None:
            sums = self.trainer.strategy.reduce(sums, reduce_op="sum")
        sums = sums.cpu()
        names = ["loss"] + [f"loss_{name}" for name in MODALITY_NAMES.values()]
        metrics = {f"val/{name}": (s / n).float() for name, (s, n) in zip(names, sums.unbind(0)) if n > 0}
        metrics["val/targets"] = sums[0, 1].float()
        # Already summed over ranks, so every rank holds the same values (sync_dist only averages equals).
        self.log_dict(metrics, sync_dist=True)

    # ---- export ----------------------------------------------------------------------------------
    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """The LLM's full state dict on CPU (split layout). Under FSDP2 this is a collective that every rank
        must enter; the full dict is returned on rank 0 only (empty elsewhere)."""
        from torch.distributed.tensor import DTensor

        if any(isinstance(p, DTensor) for p in self.llm.parameters()):
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            return get_model_state_dict(self.llm, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return {k: v.detach().cpu() for k, v in self.llm.state_dict().items()}

    def export(self, directory: str | Path) -> None:
        """Write a Hugging Face directory (model, tokenizer, vocabulary JSON). Call on every rank."""
        state = self.full_state_dict()
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        if rank != 0:
            return
        state = join_vocabulary_rows(state)
        config = copy.deepcopy(self.llm.config)
        config.vocab_size, config.use_cache = self.vocabulary.size, True
        config.tie_word_embeddings = False
        dtype = _dtype(self.export_dtype)
        if dtype is not None:
            state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
        with torch.device("meta"):
            model = LlamaForCausalLM(config)
        model.load_state_dict(state, strict=True, assign=True)
        model.config.use_cache = True
        if dtype is not None:
            model.config.dtype = dtype
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(directory)
        self.tokenizer.save_pretrained(directory)
        vocab = self.vocabulary
        (directory / VOCABULARY_FILE).write_text(json.dumps({
            "text_size": vocab.text_size, "visual_codes": vocab.visual_codes, "motion_codes": vocab.motion_codes,
            "size": vocab.size, "image_start_id": vocab.image_start_id, "image_end_id": vocab.image_end_id,
            "visual_offset": vocab.visual_offset, "motion_start_id": vocab.motion_start_id,
            "motion_end_id": vocab.motion_end_id, "motion_offset": vocab.motion_offset,
        }, indent=2))

    def on_fit_end(self) -> None:
        # Every rank enters export (gathering FSDP2 shards is a collective); rank 0 writes.
        if self.export_dir:
            self.export(self.export_dir)
            if self._trainer is not None:
                self.trainer.strategy.barrier("pretrain_export")
