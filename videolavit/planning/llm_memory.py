"""Per-rank memory of training a Llama decoder under FSDP2: parameters, gradients, AdamW state,
FSDP2's gathered buffers and activations, with and without activation checkpointing.

Why: a 7B run that does not fit is found out after queueing for GPUs; this arithmetic is exact for the
parameter-sized terms and measured for activations. Activations are the bytes autograd saves for backward
(``saved_activations``) in one forward of the stage's computation - embedding, decoder layers, ``lm_head``
on the joined vocabulary rows, token cross-entropy on fp32 logits - run on the meta device at 1 and 2
layers with a fused attention kernel's memory behaviour and extrapolated linearly in the layers (every
layer saves the same). With activation checkpointing a layer keeps only its input hidden states and one
layer's activations exist again while it is recomputed.

Not counted: the CUDA context, NCCL buffers, allocator fragmentation and transient backward buffers
(the gradient of the logits, about the size of the fp32 log-probabilities); ``reserve_bytes`` stands
for them in the total.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F

from videolavit.planning.saved_activations import SavedTensorBytes, flash_attention_on_meta

GIB = 1024**3


@dataclass(frozen=True)
class LlamaShape:
    """The sizes of a Llama decoder that memory and FLOPs depend on."""

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int
    max_position_embeddings: int = 4096

    @classmethod
    def from_config(cls, config) -> LlamaShape:
        heads = config.num_attention_heads
        return cls(config.hidden_size, config.intermediate_size, config.num_hidden_layers, heads,
                   getattr(config, "num_key_value_heads", None) or heads, config.vocab_size,
                   getattr(config, "max_position_embeddings", 4096))

    def config(self, layers: int | None = None):
        from transformers import LlamaConfig

        sizes = asdict(self)
        sizes["num_hidden_layers"] = self.num_hidden_layers if layers is None else layers
        return LlamaConfig(**sizes, tie_word_embeddings=False, use_cache=False)

    @property
    def layer_parameters(self) -> int:
        h, head_dim = self.hidden_size, self.hidden_size // self.num_attention_heads
        attention = h * head_dim * (2 * self.num_attention_heads + 2 * self.num_key_value_heads)
        return attention + 3 * h * self.intermediate_size + 2 * h

    @property
    def root_parameters(self) -> int:
        """Embedding, ``lm_head`` and the final norm (sharded with the root module)."""
        return 2 * self.vocab_size * self.hidden_size + self.hidden_size

    @property
    def parameters(self) -> int:
        return self.num_hidden_layers * self.layer_parameters + self.root_parameters


# Llama-2-7B (Touvron et al. 2023), used when a config's model directory is not on this machine.
LLAMA2_7B = LlamaShape(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=32, vocab_size=32000)


def _saved_bytes_on_meta(shape: LlamaShape, layers: int, micro_batch: int, seq_len: int,
                         dtype: torch.dtype) -> int:
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(shape.config(layers)).to(dtype)
        ids = torch.zeros(micro_batch, seq_len, dtype=torch.long)
        positions = torch.arange(seq_len)[None].expand(micro_batch, -1)
    model.set_attn_implementation("sdpa")
    model.train()
    decoder = model.model
    with flash_attention_on_meta(), SavedTensorBytes(exclude=model.parameters()) as saved:
        # LlamaModel.forward without its mask construction (data-dependent, so not on meta): with no mask
        # the layers attend causally, the saved sizes of packed rows.
        hidden = decoder.embed_tokens(ids)
        rotary = decoder.rotary_emb(hidden, position_ids=positions)
        for layer in decoder.layers:
            hidden = layer(hidden, attention_mask=None, position_ids=positions, position_embeddings=rotary)
        logits = model.lm_head(decoder.norm(hidden))[:, :-1]
        F.cross_entropy(logits.float().flatten(0, 1), ids[:, 1:].flatten(), reduction="none").sum()
    return saved.bytes


@dataclass
class ActivationBytes:
    per_layer: int  # one decoder layer's saved tensors
    outside_layers: int  # embedding output, rotary tables, final norm, lm_head, cross-entropy
    layer_input: int  # what a checkpointed layer keeps: its input hidden states
    layers: int

    @property
    def full(self) -> int:
        return self.outside_layers + self.layers * self.per_layer

    @property
    def checkpointed(self) -> int:
        return self.outside_layers + self.layers * self.layer_input + self.per_layer


def llama_activation_bytes(shape: LlamaShape, micro_batch: int, seq_len: int, dtype: torch.dtype = torch.bfloat16,
                           split_lm_head: bool = True) -> ActivationBytes:
    """Activation bytes of one micro-batch (``micro_batch`` rows of ``seq_len`` tokens) in ``dtype``.
    ``split_lm_head``: the stage joins the split vocabulary rows of ``lm_head`` into a new tensor that the
    matmul keeps (the embedding's join is not kept: its backward needs the ids only)."""
    one = _saved_bytes_on_meta(shape, 1, micro_batch, seq_len, dtype)
    two = _saved_bytes_on_meta(shape, 2, micro_batch, seq_len, dtype)
    per_layer = two - one
    joined = shape.vocab_size * shape.hidden_size * dtype.itemsize if split_lm_head else 0
    return ActivationBytes(per_layer=per_layer, outside_layers=one - per_layer + joined,
                           layer_input=micro_batch * seq_len * shape.hidden_size * dtype.itemsize,
                           layers=shape.num_hidden_layers)


@dataclass
class RankMemory:
    """Bytes per rank; ``total`` uses the activations of the configured checkpointing."""

    parameters: int
    gradients: int
    optimizer: int
    fsdp_buffers: int
    activations: int
    activations_checkpointed: int
    activation_checkpointing: bool
    reserve: int
    notes: list[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        acts = self.activations_checkpointed if self.activation_checkpointing else self.activations
        return self.parameters + self.gradients + self.optimizer + self.fsdp_buffers + acts + self.reserve


def llama_fsdp_memory(shape: LlamaShape, micro_batch: int, seq_len: int, shards: int, activation_checkpointing: bool,
                      master_dtype: torch.dtype = torch.float32, compute_dtype: torch.dtype = torch.bfloat16,
                      reserve_bytes: int = 0, sharded: bool = True) -> RankMemory:
    """FSDP2 (``fully_shard`` per decoder layer and the root) over ``shards`` ranks: master weights,
    gradients (in the master dtype) and AdamW's two moments are 1/shards each; a layer's parameters are
    gathered in ``compute_dtype`` with the next one prefetched, the root's (embedding, ``lm_head``) for the
    whole forward and backward, and a layer's unsharded gradient exists until its reduce-scatter.
    ``sharded=False``: plain replication (DDP), no gathered copies."""
    n, master = shape.parameters, master_dtype.itemsize
    divisor = shards if sharded else 1
    acts = llama_activation_bytes(shape, micro_batch, seq_len, compute_dtype)
    buffers = 0
    if sharded:
        gathered = (2 * shape.layer_parameters + shape.root_parameters) * compute_dtype.itemsize
        buffers = gathered + shape.layer_parameters * (compute_dtype.itemsize + 4)
    return RankMemory(parameters=-(-n * master // divisor), gradients=-(-n * master // divisor),
                      optimizer=-(-2 * n * master // divisor), fsdp_buffers=buffers, activations=acts.full,
                      activations_checkpointed=acts.checkpointed,
                      activation_checkpointing=activation_checkpointing, reserve=reserve_bytes)
