"""Text tokenizer: load the LLM's tokenizer from a local directory, or build a tiny one on the fly.

The text tokenizer owns ids [0, text_size) of the unified vocabulary; visual and motion ids are never
produced by it (they are inserted by id, see ``sequences``). Loading therefore checks that the
tokenizer's size is exactly the vocabulary's text size: a larger tokenizer would emit ids that collide
with ``[IMG]`` and the keyframe codes, a smaller one means the wrong tokenizer directory.

Nothing here touches the network: ``AutoTokenizer`` is called with ``local_files_only=True``.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from videolavit.llm.vocabulary import Vocabulary

# Llama's special tokens and ids; the tiny tokenizer copies them so code paths are identical.
UNK_TOKEN, BOS_TOKEN, EOS_TOKEN = "<unk>", "<s>", "</s>"
UNK_ID, BOS_ID, EOS_ID = 0, 1, 2


class TokenizerMismatchError(ValueError):
    """The tokenizer in a directory does not fit the vocabulary layout it is used with."""


def load_text_tokenizer(directory: str | Path, vocab: Vocabulary | None = None) -> PreTrainedTokenizerBase:
    """Load the tokenizer in ``directory`` (no downloads) and check it against ``vocab``.

    The tokenizer must be a fast tokenizer (offsets are needed to mask conversation turns), define bos
    and eos, and have exactly ``vocab.text_size`` ids. A missing pad token is set to unk, as LLaVA and
    the release's understanding runner do for Llama.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"tokenizer directory {directory} does not exist")
    tokenizer = AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
    if not getattr(tokenizer, "is_fast", False):
        raise TokenizerMismatchError(f"{directory} holds a slow tokenizer; a fast (tokenizers) one is required")
    if tokenizer.bos_token_id is None or tokenizer.eos_token_id is None:
        raise TokenizerMismatchError(f"tokenizer in {directory} defines no bos or eos token")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.unk_token if tokenizer.unk_token is not None else tokenizer.eos_token
    if vocab is not None and len(tokenizer) != vocab.text_size:
        raise TokenizerMismatchError(
            f"tokenizer in {directory} has {len(tokenizer)} ids but the vocabulary's text size is "
            f"{vocab.text_size}; its ids would not line up with [IMG]={vocab.image_start_id}")
    return tokenizer


def build_tiny_tokenizer(directory: str | Path, texts: Iterable[str], vocab_size: int = 512
                         ) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE with exactly ``vocab_size`` ids on ``texts`` and save it to ``directory``.

    Llama-like specials: unk ``<unk>`` 0, bos ``<s>`` 1, eos ``</s>`` 2, pad = unk; the tokenizer adds
    bos (not eos) when asked for special tokens, like Llama. Byte-level means any string encodes, so
    tests never hit unk. If the corpus is too small to learn enough merges, the remaining ids are
    filled with never-occurring ``<unused_k>`` tokens so that ``len(tokenizer) == vocab_size`` holds,
    which ``load_text_tokenizer`` checks against ``Vocabulary.text_size``.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    specials = [UNK_TOKEN, BOS_TOKEN, EOS_TOKEN]
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    minimum = len(specials) + len(alphabet)
    if vocab_size < minimum:
        raise ValueError(f"a byte-level tokenizer needs at least {minimum} ids, got vocab_size={vocab_size}")

    model = Tokenizer(models.BPE(unk_token=UNK_TOKEN))
    model.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    model.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=alphabet, show_progress=False)
    model.train_from_iterator(list(texts), trainer)
    missing = vocab_size - model.get_vocab_size()
    if missing > 0:
        model.add_tokens([f"<unused_{k}>" for k in range(missing)])
    model.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single=f"{BOS_TOKEN} $A", pair=f"{BOS_TOKEN} $A {BOS_TOKEN} $B",
                                      special_tokens=[(BOS_TOKEN, BOS_ID)]),
    ])
    ids = [model.token_to_id(t) for t in specials]
    if ids != [UNK_ID, BOS_ID, EOS_ID]:
        raise RuntimeError(f"special token ids came out as {ids}")

    tokenizer = PreTrainedTokenizerFast(tokenizer_object=model, unk_token=UNK_TOKEN, bos_token=BOS_TOKEN,
                                        eos_token=EOS_TOKEN, pad_token=UNK_TOKEN)
    if len(tokenizer) != vocab_size:
        raise RuntimeError(f"built {len(tokenizer)} ids instead of {vocab_size}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(str(directory))
    return tokenizer
