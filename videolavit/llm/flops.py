"""Model FLOPs of decoder-only LLM training, for tokens/s → MFU (model FLOPs utilisation).

Convention (PaLM, Chowdhery et al. 2022, app. B): per trained token, 6·N for the weight matmuls
(forward 2·N, backward 4·N, N = every matmul parameter including ``lm_head`` but not the embedding
lookup) plus 12·L·H·Q·T for attention scores and values (L layers, H heads, Q head dim, T sequence
length). Activation recomputation is not counted (that would be hardware FLOPs utilisation), so MFU is
comparable across checkpointing settings.
"""

from __future__ import annotations


def matmul_parameters(hidden: int, intermediate: int, layers: int, heads: int, kv_heads: int, vocab: int) -> int:
    """Weights multiplied per token in a Llama decoder (attention q/k/v/o, gated MLP, lm_head)."""
    head_dim = hidden // heads
    attention = hidden * head_dim * (2 * heads + 2 * kv_heads)  # q and o: H heads; k and v: kv heads
    mlp = 3 * hidden * intermediate
    return layers * (attention + mlp) + hidden * vocab


def training_flops_per_token(config, seq_len: int) -> float:
    """6·N + 12·L·H·Q·T for a ``LlamaConfig``-like object (hidden_size, intermediate_size, ...)."""
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    n = matmul_parameters(config.hidden_size, config.intermediate_size, config.num_hidden_layers, heads,
                          kv_heads, config.vocab_size)
    head_dim = config.hidden_size // heads
    return 6.0 * n + 12.0 * config.num_hidden_layers * heads * head_dim * seq_len


def model_flops_utilisation(tokens_per_s: float, flops_per_token: float, peak_flops: float | None) -> float | None:
    """Achieved model FLOP/s over the hardware's peak (all devices together); None if the peak is unknown."""
    if not peak_flops:
        return None
    return tokens_per_s * flops_per_token / peak_flops
