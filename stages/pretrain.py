"""Stage 2: unified generative pre-training of the LLM (paper §3.3, A.2; docs/design.md §8, §10).

A ``LlamaForCausalLM`` - Llama-2-7B from a local Hugging Face directory (``llm_path``), or a
``LlamaConfig`` built on the fly (``llm_config``, tiny runs) - learns next-token prediction over packed
rows of video-text pairs (both orders) and text-only documents (``datamodules.llm_views``). The id
layout is ``Vocabulary`` (release: 49412 ids); the embedding matrix and ``lm_head`` are resized to it at
construction (transformers 5: before the optimizer exists).

The paper trains the new vocabulary rows at a higher learning rate than the LLM, which AdamW cannot do by
scaling gradients, so the stage splits those rows into their own parameters (docs/design.md §8) and joins
them again at export: the exported directory is a plain ``LlamaForCausalLM`` checkpoint with the tokenizer
and ``videolavit_vocabulary.json``. No rank ever holds the whole model: it is built on the meta device,
sharded with FSDP2 and each rank reads only its own rows of the weight files (docs/design.md §10).
Learning rates, losses and logs, sharding and export in detail: ``PretrainStage``'s docstring.
"""

from __future__ import annotations

import copy
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import nn
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

from stages.base import OptimizerConfig, StageModule
from stages.nonfinite_guard import NonFiniteExportError, nonfinite_names
from stages.staged_export import write_staged
from videolavit.config_errors import StageConfigError
from videolavit.llm.flops import training_flops_per_token
from videolavit.llm.sequences import IGNORE_INDEX, PAD_DOCUMENT_ID
from videolavit.llm.sharded_weights import (DEFAULT_SHARD_BYTES, SafetensorsDirectory, SafetensorsShardWriter,
                                            WeightsError, full_tensor, load_rows_into)
from videolavit.llm.text_tokenizer import (build_tiny_tokenizer, load_text_tokenizer, save_portable_tokenizer,
                                         with_block_markers)
from videolavit.llm.vocabulary import Modality, Vocabulary, write_vocabulary_file
from videolavit.models.export_names import LLM

EXPORT_NAME = LLM
# Weight files of a previous export that a new one with another sharding would leave behind.
HF_WEIGHT_FILES = ("model*.safetensors", "model.safetensors.index.json", "pytorch_model*.bin",
                   "pytorch_model.bin.index.json")
NEW_ROW_PARAMETERS = ("llm.model.embed_tokens.new", "llm.lm_head.new")
# Attention kernels that keep packed documents apart from ``position_ids`` at every batch size. transformers'
# flash-attention path finds document boundaries in ``position_ids`` only for batch size 1 (otherwise packed
# documents attend to each other, silently); the stage does not pass ``cu_seqlens``, so it is refused.
PACKED_ATTENTION_IMPLEMENTATIONS = ("sdpa", "eager")
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


class AttentionImplementationError(StageConfigError):
    """``attn_implementation`` names a kernel that would let packed documents attend to each other."""


def check_attn_implementation(name: str) -> str:
    """``name`` if it keeps packed documents apart (``PACKED_ATTENTION_IMPLEMENTATIONS``); raises otherwise."""
    if name in PACKED_ATTENTION_IMPLEMENTATIONS:
        return name
    why = (" (transformers finds packed documents in position_ids only at batch size 1, so rows of several "
           "documents would attend across them)" if "flash" in str(name) else "")
    raise AttentionImplementationError(
        f"attn_implementation={name!r} is not supported by the LLM stages{why}; set model.attn_implementation "
        f"to one of {list(PACKED_ATTENTION_IMPLEMENTATIONS)}")


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


def mean_resized_rows(old: torch.Tensor, count: int, seed: int = 0) -> torch.Tensor:
    """``count`` new rows drawn around the mean of ``old`` with 1e-9 of its covariance (as transformers'
    ``resize_token_embeddings(mean_resizing=True)``; just the mean when that covariance is not positive
    definite). Seeded, so every rank computes the same rows and keeps the slice of its shard."""
    total = torch.zeros(old.shape[1], dtype=torch.float64)
    gram = torch.zeros(old.shape[1], old.shape[1], dtype=torch.float64)
    for chunk in old.split(4096):  # bounded float64 copies, whatever the vocabulary
        chunk = chunk.double()
        total += chunk.sum(0)
        gram += chunk.T @ chunk
    mean = total / old.shape[0]
    covariance = gram / old.shape[0] - torch.outer(mean, mean)
    noise = torch.randn(count, old.shape[1], generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    factor, info = torch.linalg.cholesky_ex(1e-9 * covariance)
    rows = mean + noise @ factor.T if int(info) == 0 else mean.expand(count, -1)
    return rows.float()


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
    """Stage 2: next-token pre-training of a ``LlamaForCausalLM`` over packed multimodal rows.

    **Learning rates** (why: docs/design.md §8). The stage splits the vocabulary rows of both the input embedding
    and ``lm_head`` into two parameters (``SplitEmbedding`` / ``SplitLMHead``):

    * ``llm.model.embed_tokens.base`` / ``llm.lm_head.base``: rows ``[0, text_size)``, the pretrained text
      vocabulary;
    * ``llm.model.embed_tokens.new``  / ``llm.lm_head.new`` : rows ``[text_size, size)``, the new
      ``[IMG]``/``[/IMG]``/keyframe/``[MOV]``/``[/MOV]``/motion rows (``NEW_ROW_PARAMETERS``),

    concatenated inside ``forward``. ``optimizer.extra_lr`` maps those two prefixes to 5e-5 (the default
    ``optimizer`` does; a YAML that overrides ``optimizer`` must list them, see experiments/stage2_pretrain.yaml);
    everything else runs at ``optimizer.lr`` = 2e-5. The export joins the rows again, so the exported directory is a
    plain ``LlamaForCausalLM`` checkpoint. New rows start as in ``resize_token_embeddings`` (mean of the old rows
    plus small noise); in a model built from a config all rows are random.

    **Loss and logs.** ``forward`` gets ``input_ids`` + ``position_ids`` with ``use_cache=False`` and no 2-D
    attention mask (packed documents stay separate, see ``videolavit.llm.sequences``). Loss = token-mean next-token
    cross-entropy over the labels (-100 ignored). Logged: ``train/loss``, per target modality ``train/loss_text`` /
    ``train/loss_keyframe`` / ``train/loss_motion`` / ``train/loss_special`` (the four block markers),
    ``train/padding_fraction``; on validation the token-weighted ``val/loss`` and ``val/loss_<modality>`` summed
    over all ranks. Throughput is Lightning's ``ThroughputMonitor`` callback (in the YAML configs, with
    ``callbacks.batch_measures``): the stage sets ``flops_per_batch`` (``model_flops``, ``videolavit.llm.flops``) on
    every batch, so the monitor logs ``train/device/items_per_sec`` (target tokens), ``.../samples_per_sec``,
    ``.../flops_per_sec`` and, on GPUs it knows, ``train/device/mfu`` (all-rank totals without ``device/``).

    **Scale.** No rank holds the whole model. With ``llm_path`` the LLM is built on the meta device in ``__init__``;
    ``configure_model`` shards it (with Lightning's ``ModelParallelStrategy``, which sets ``self.device_mesh``:
    FSDP2 ``fully_shard`` on every decoder layer and then the whole LLM over the ``data_parallel`` mesh dimension;
    tensor parallelism is not implemented, ``tensor_parallel_size`` must be 1; optionally a bf16 parameter
    ``MixedPrecisionPolicy``) and then ``materialize`` gives each shard storage on the strategy's device and reads
    into it only its own rows of the safetensors files (``videolavit.llm.sharded_weights``), in ``load_dtype``.
    ``init_from`` set before that (a trainer's order: ``setup`` runs first) replaces the weights source; resuming
    (``--ckpt_path``) skips the read, the checkpoint restores every weight. Outside a trainer call
    ``configure_model()`` (or ``materialize()``) before using the model. ``llm_config`` models (tiny runs) are
    initialised randomly and in full at construction, identically on every rank under the same seed. Activation
    checkpointing (non-reentrant) is the decoder layers' own (``gradient_checkpointing_enable``). Under FSDP2 every
    rank must run the same number of forward passes: give every rank the same number of validation batches
    (``limit_val_batches``).

    **Export** (``export_dir``, at the end of ``fit``; or ``export(dir)``, on every rank): one parameter at a time
    is gathered and handed to rank 0, which keeps it in ``export_dtype`` until its safetensors file (about 2 GB
    each, with an index) is written; then config, tokenizer and ``videolavit_vocabulary.json``. The tokenizer gets
    ``[IMG]`` ``[/IMG]`` ``[MOV]`` ``[/MOV]`` as named special tokens at their vocabulary ids and the conversation
    format as its chat template (``export_tokenizer``), so
    ``AutoTokenizer.from_pretrained(dir).apply_chat_template(...)`` renders the instruct stage's prompts.
    ``transformers.AutoModelForCausalLM.from_pretrained(dir, dtype="auto")`` loads it as is (``use_cache`` back on;
    without ``dtype`` transformers 4.x upcasts to float32).

    Args:
        tokenizer_path: local directory of the text tokenizer (``vocabulary.text_size`` ids).
        vocabulary: the id layout (release: text 32000, keyframe 16384, motion 1024 -> 49412 ids).
        llm_path: local Hugging Face directory of the initial LLM (e.g. Llama-2-7B); no downloads.
        llm_config: ``LlamaConfig`` keyword arguments for a freshly initialised LLM (tiny runs);
            ``vocab_size`` is set to ``vocabulary.size``. Exactly one of ``llm_path`` / ``llm_config``.
        build_tokenizer_if_missing: build a tiny tokenizer into ``tokenizer_path`` if it does not exist
            (``TokenizerBuild``; tiny runs). None: the directory must exist.
        attn_implementation: ``sdpa`` (default) or ``eager``; both honour packed position ids. Anything else
            (``flash_attention_2`` included) raises ``AttentionImplementationError``.
        activation_checkpointing: recompute each decoder layer in the backward pass.
        fsdp_param_dtype: FSDP2 ``MixedPrecisionPolicy`` parameter dtype (e.g. ``bfloat16``: all-gathers and
            compute in bf16, gradients reduced in fp32); None: no policy (the trainer's precision applies).
        fsdp_reshard_after_forward: FSDP2 ``reshard_after_forward`` (ZeRO-3 when true).
        load_dtype: dtype ``llm_path`` is loaded in (the master weights; float32 for bf16-mixed).
        export_dtype: dtype of the exported weights (None: as trained).
        optimizer: AdamW + cosine (``default_optimizer()``: paper Table 6, new vocabulary rows at 5e-5).
        init_from: a previous pre-training export (HF directory) to start a new run from.
        export_dir: where ``fit`` writes the Hugging Face export at the end.
        max_nonfinite_steps: non-finite optimizer steps in a row that stop ``fit`` (``StageModule``).
        chat_template: conversation template the exported tokenizer's ``chat_template`` renders (``"v1"``,
            what the instruct stage trains on by default, or ``"video_lavit_release"``).
    """

    export_name = EXPORT_NAME

    def __init__(self, tokenizer_path: str, vocabulary: Vocabulary | None = None, llm_path: str | None = None,
                 llm_config: dict | None = None, build_tokenizer_if_missing: TokenizerBuild | None = None,
                 attn_implementation: str = "sdpa", activation_checkpointing: bool = False,
                 fsdp_param_dtype: str | None = None, fsdp_reshard_after_forward: bool = True,
                 load_dtype: str = "float32", export_dtype: str | None = None,
                 optimizer: OptimizerConfig | None = None, init_from: str | None = None,
                 export_dir: str | None = None, max_nonfinite_steps: int = 20, chat_template: str = "v1"):
        super().__init__(optimizer=optimizer or default_optimizer(), init_from=init_from, export_dir=export_dir,
                         max_nonfinite_steps=max_nonfinite_steps)
        self.save_hyperparameters()
        check_attn_implementation(attn_implementation)
        self.vocabulary = vocabulary or Vocabulary.release()
        self.tokenizer_path = tokenizer_path
        self.fsdp_param_dtype, self.fsdp_reshard_after_forward = fsdp_param_dtype, fsdp_reshard_after_forward
        self.export_dtype = export_dtype
        self.chat_template = chat_template
        if build_tokenizer_if_missing is not None and not Path(tokenizer_path).is_dir():
            self._build_tokenizer(build_tokenizer_if_missing)
        self.tokenizer = load_text_tokenizer(tokenizer_path, self.vocabulary)
        self._weights_source: str | None = None  # HF directory the meta-device LLM loads in configure_model
        self.llm = self._build_llm(llm_path, llm_config, attn_implementation, _dtype(load_dtype))
        if activation_checkpointing:
            self.llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self._val_sums = torch.zeros(len(MODALITY_NAMES) + 1, 2, dtype=torch.float64)  # loss sum, targets
        self.flops_per_batch: float | None = None  # set per batch; read by Lightning's ThroughputMonitor

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
            config = LlamaConfig.from_pretrained(llm_path, local_files_only=True)
            self._source_rows(llm_path, allow_text_only=True)  # refuses unreadable weights before any work
            config.vocab_size = vocab.size
            with torch.device("meta"):  # no memory: weights arrive shard by shard in configure_model
                llm = LlamaForCausalLM(config)
            if load_dtype is not None:
                llm.to(load_dtype)
            llm.train()  # Lightning keeps module modes as they are, and checkpointing needs train mode
            self._weights_source = llm_path
        else:
            config = dict(llm_config)
            if config.setdefault("vocab_size", vocab.size) != vocab.size:
                raise ValueError(f"llm_config.vocab_size={config['vocab_size']} but the vocabulary has "
                                 f"{vocab.size} ids")
            config.setdefault("tie_word_embeddings", False)
            llm = LlamaForCausalLM(LlamaConfig(**config))
        llm.set_attn_implementation(attn)
        llm.config.vocab_size = vocab.size
        llm.config.use_cache = False  # a KV cache switches off packed-document masking (see sequences)
        split_vocabulary_rows(llm, vocab.text_size)
        return llm

    def _source_rows(self, directory: str, allow_text_only: bool) -> int:
        """Vocabulary rows of the weights in ``directory`` (the text vocabulary or the full layout)."""
        reader = SafetensorsDirectory(directory)
        rows = reader.shape("model.embed_tokens.weight")[0]
        allowed = (self.vocabulary.text_size, self.vocabulary.size) if allow_text_only else (self.vocabulary.size,)
        if rows not in allowed:
            raise ValueError(f"{directory} has {rows} vocabulary rows; expected "
                             + ("the text vocabulary ({}) or ".format(self.vocabulary.text_size) if allow_text_only
                                else "") + f"the full layout ({self.vocabulary.size})")
        return rows

    # ---- weights: meta device -> shards ----------------------------------------------------------
    def is_materialized(self) -> bool:
        """False until ``configure_model`` has given the (meta-device) LLM storage and weights."""
        return not any(p.device.type == "meta" for p in self.llm.parameters())

    def materialize(self, device: torch.device | str | None = None) -> None:
        """Give the meta-device LLM (sharded or not) storage on ``device`` and load its weights source into
        it, one tensor at a time: each rank reads only the rows of its own shards. ``configure_model`` calls
        this; call it (or ``configure_model``) yourself when using the stage outside a trainer."""
        if self.is_materialized():
            return
        device = torch.device(device or "cpu")
        self.llm.to_empty(device=device)
        rotary = self.llm.model.rotary_emb
        fresh = type(rotary)(config=self.llm.config)  # non-persistent buffers: in no checkpoint, recomputed
        for name, buffer in fresh.named_buffers():
            getattr(rotary, name).copy_(buffer.to(device))
        meta = [name for name, b in self.llm.named_buffers() if b.device.type == "meta"]
        if meta:
            raise RuntimeError(f"buffers left on the meta device: {meta}")
        if self._resuming():
            rank_zero_info("PretrainStage: resuming; the checkpoint restores every weight (skipping "
                           f"{self._weights_source})")
            return
        self._load_weights(self._weights_source)

    def _resuming(self) -> bool:
        return self._trainer is not None and self.trainer.ckpt_path is not None

    @torch.no_grad()
    def _load_weights(self, directory: str) -> None:
        """Copy a HF directory's weights into the LLM's (possibly sharded) parameters, tensor by tensor.
        A text-only embedding / ``lm_head`` gets its new rows by mean resizing (``mean_resized_rows``)."""
        reader = SafetensorsDirectory(directory)
        rows = self._source_rows(directory, allow_text_only=True)
        split, fresh_rows = self.vocabulary.text_size, {}
        expected = set()
        for name, param in self.llm.named_parameters():
            prefix, _, part = name.rpartition(".")
            if prefix in ("model.embed_tokens", "lm_head"):
                key = f"{prefix}.weight"
                if part == "base":
                    fetch = (lambda k: lambda a, b: reader.rows(k, a, b))(key)
                elif rows == self.vocabulary.size:
                    fetch = (lambda k: lambda a, b: reader.rows(k, split + a, split + b))(key)
                else:
                    fresh_rows[key] = mean_resized_rows(reader.full(key), self.vocabulary.size - split)
                    fetch = (lambda k: lambda a, b: fresh_rows[k][a:b])(key)
            else:
                key = name
                fetch = (lambda k: lambda a, b: reader.rows(k, a, b))(key)
            if key not in reader:
                raise WeightsError(f"{directory} has no tensor {key!r} (needed for {name})")
            if tuple(reader.shape(key)[1:]) != tuple(param.shape[1:]):
                raise WeightsError(f"{directory}: {key} has shape {reader.shape(key)}, the model's {name} is "
                                   f"{tuple(param.shape)}")
            expected.add(key)
            load_rows_into(param, fetch)
            if part == "new":
                fresh_rows.pop(key, None)
        unexpected = [k for k in reader.keys() if k not in expected and "rotary_emb" not in k]
        if unexpected:
            raise WeightsError(f"{directory} holds tensors the model does not have: {unexpected[:5]}")

    def load_init_from(self, directory: str) -> None:
        """Start from a previous pre-training export (a HF directory of this layout). Before
        ``configure_model`` (a trainer's order) it becomes the weights source; afterwards it is loaded
        into the current (possibly sharded) parameters."""
        if not Path(directory).is_dir():
            raise FileNotFoundError(f"init_from directory {directory} does not exist")
        self._source_rows(directory, allow_text_only=False)
        if self.is_materialized():
            self._load_weights(directory)
        else:
            self._weights_source = directory

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
        """FSDP2 per decoder layer, then the root, when the strategy provides a device mesh; then the
        meta-device LLM gets storage on the strategy's device and its weights (``materialize``)."""
        mesh = self.device_mesh
        device = self.trainer.strategy.root_device if self._trainer is not None else None
        if mesh is None:
            self.materialize(device)
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
        self.materialize(device if device is not None else dp_mesh.device_type)

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
        super().on_train_batch_start(batch, batch_idx)
        self.flops_per_batch = self.model_flops(batch, training=True)

    def on_validation_batch_start(self, batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        self.flops_per_batch = self.model_flops(batch, training=False)

    def model_flops(self, batch: dict, training: bool = True) -> float:
        """Model FLOPs of one batch on this device (``videolavit.llm.flops``; padding included, as it is
        computed): what Lightning's ``ThroughputMonitor`` reads as ``flops_per_batch`` for FLOP/s and MFU.
        Validation runs the forward pass only, a third of a training step's FLOPs."""
        rows, seq_len = batch["input_ids"].shape
        flops = training_flops_per_token(self.llm.config, seq_len) * rows * seq_len
        return flops if training else flops / 3

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

    def export(self, directory: str | Path, max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> None:
        """Write a Hugging Face directory (model, tokenizer, vocabulary JSON). Call on every rank: the
        parameters are gathered one at a time (a collective under FSDP2) and only rank 0 keeps them, in the
        export dtype, until the safetensors file they belong to is written.

        Refuses (``NonFiniteExportError``) weights that are NaN/inf as exported (in ``export_dtype``); the files
        are written next to ``directory`` and moved in when complete, so a failure leaves it untouched."""
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        dtype = _dtype(self.export_dtype)
        state = self.llm.state_dict()
        joined = {f"{p}.weight": (f"{p}.base", f"{p}.new") for p in ("model.embed_tokens", "lm_head")}
        layout = [(name, (name,)) for name in state if not name.startswith(("model.embed_tokens.", "lm_head."))]
        layout = [(name, parts) for name, parts in joined.items()] + layout
        if rank != 0:
            for _, parts in layout:  # join rank 0's all-gathers, one parameter at a time
                for part in parts:
                    full_tensor(state[part])
            return
        write_staged(directory, lambda scratch: self._write_hf_directory(scratch, state, layout, dtype,
                                                                         max_shard_bytes),
                     replaces=HF_WEIGHT_FILES)

    def _write_hf_directory(self, directory: Path, state: dict, layout: list, dtype: torch.dtype | None,
                            max_shard_bytes: int) -> None:
        def nbytes(parts) -> int:
            size = (dtype or state[parts[0]].dtype).itemsize
            return sum(state[p].numel() for p in parts) * size

        writer = SafetensorsShardWriter(directory, [(n, nbytes(p)) for n, p in layout], max_shard_bytes)
        bad = []
        for name, parts in layout:
            pieces = [full_tensor(state[p]) for p in parts]  # every rank: all-gather of one parameter
            value = torch.cat(pieces) if len(pieces) > 1 else pieces[0]
            value = value.to(device="cpu", dtype=dtype or value.dtype)
            del pieces
            if nonfinite_names([(name, value)]):
                bad.append(name)
                continue
            if not bad:
                writer.add(name, value)
        if bad:
            raise NonFiniteExportError(f"{type(self).__name__}: refusing to export non-finite weights {bad[:8]}"
                                       f"{' ...' if len(bad) > 8 else ''}; {self.export_dir or 'the export directory'}"
                                       " was left as it was")
        writer.close()
        config = copy.deepcopy(self.llm.config)
        config.vocab_size, config.use_cache = self.vocabulary.size, True
        config.tie_word_embeddings = False
        config.architectures = [LlamaForCausalLM.__name__]
        config.dtype = dtype or next(iter(state.values())).dtype
        config.save_pretrained(directory)
        GenerationConfig.from_model_config(config).save_pretrained(directory)
        save_portable_tokenizer(self.export_tokenizer(), directory)
        write_vocabulary_file(directory, self.vocabulary)

    def export_tokenizer(self):
        """The text tokenizer as exported: the block markers as named special tokens at their ids
        (``with_block_markers``) and ``chat_template`` as its Hugging Face chat template."""
        from videolavit.inference.video_chat import template_by_name

        tokenizer = with_block_markers(self.tokenizer, self.vocabulary)
        tokenizer.chat_template = template_by_name(self.chat_template).chat_template()
        return tokenizer

    def on_fit_end(self) -> None:
        # Every rank checks its shards and enters export (gathering FSDP2 shards is a collective); rank 0
        # writes. The check first, on all ranks, so that no rank is left waiting when rank 0 refuses.
        if self.export_dir:
            self.check_exportable(cast_to=_dtype(self.export_dtype))
            self.export(self.export_dir)
            if self._trainer is not None:
                self.trainer.strategy.barrier("pretrain_export")
