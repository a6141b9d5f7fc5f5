"""Training FLOPs per token (the MFU numerator) against a hand count and measured parameter counts."""

import pytest
from transformers import LlamaConfig, LlamaForCausalLM

from videolavit.llm.flops import matmul_parameters, model_flops_utilisation, training_flops_per_token


def test_matmul_parameters_equal_the_model_linear_weights():
    config = LlamaConfig(hidden_size=64, intermediate_size=172, num_hidden_layers=3, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=1028, tie_word_embeddings=False)
    model = LlamaForCausalLM(config)
    linear = sum(p.numel() for n, p in model.named_parameters() if n.endswith("proj.weight") or n == "lm_head.weight")
    assert matmul_parameters(64, 172, 3, 4, 2, 1028) == linear


def test_llama2_7b_flops_per_token():
    config = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=32, vocab_size=49412)
    n = 32 * (4 * 4096 * 4096 + 3 * 4096 * 11008) + 4096 * 49412
    assert training_flops_per_token(config, 2048) == pytest.approx(6 * n + 12 * 32 * 32 * 128 * 2048)
    assert 6.5e9 < n < 6.8e9  # Llama-2-7B: ~6.5B in the layers + the 49412-row head


def test_mfu():
    assert model_flops_utilisation(1000.0, 1e9, 4e12) == pytest.approx(0.25)
    assert model_flops_utilisation(1000.0, 1e9, None) is None
