"""Video-LaVIT: unified video-language pre-training with decoupled visual-motional tokenization."""

__version__ = "0.1.0"
