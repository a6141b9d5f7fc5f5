"""LLM-side data library: vocabulary layout, text tokenizer, token sequences and packing, the
instruction-tuning conversation template, and constrained decoding. No Lightning, no model weights."""
