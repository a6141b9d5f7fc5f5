"""Tiny, randomly initialised metric networks built locally for tests (no downloads)."""

from __future__ import annotations

import json
import string
from pathlib import Path

import torch
from torch import Tensor, nn
from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

CLIP_IMAGE_SIZE = 32


def build_tiny_clip(root: Path) -> tuple[CLIPModel, CLIPTokenizer, Path]:
    """A 2-layer CLIP with a letters-only BPE tokenizer, saved like a hub model under ``root``."""
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for letter in string.ascii_lowercase:
        vocab[letter] = len(vocab)
        vocab[letter + "</w>"] = len(vocab)
    (root / "vocab.json").write_text(json.dumps(vocab))
    (root / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer.from_pretrained(root)
    torch.manual_seed(0)
    config = CLIPConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=24, bos_token_id=0, eos_token_id=1,
                         pad_token_id=1),
        vision_config=dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                           image_size=CLIP_IMAGE_SIZE, patch_size=8),
        projection_dim=16,
    )
    model = CLIPModel(config).eval()
    directory = root / "tiny-clip"
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return model, tokenizer, directory


class StyleGanVDetector(nn.Module):
    """Same call signature as StyleGAN-V's i3d_torchscript.pt; answers differently to each switch."""

    def __init__(self, num_features: int = 400):
        super().__init__()
        self.proj = nn.Linear(3, num_features)

    def forward(self, x: Tensor, rescale: bool = True, resize: bool = True,
                return_features: bool = False) -> Tensor:
        if rescale or resize:
            return torch.full((x.shape[0], self.proj.out_features), float("nan"))
        features = self.proj(x.mean(dim=(2, 3, 4)))
        return features if return_features else features.softmax(dim=1)
