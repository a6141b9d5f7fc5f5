"""Text tokenizer: load the LLM's tokenizer from a local directory, or build a tiny one on the fly.

The text tokenizer owns ids [0, text_size) of the unified vocabulary; visual and motion ids are never
produced by it from text (they are inserted by id, see ``sequences``). Loading therefore checks that the
tokenizer has exactly the vocabulary's text ids: a larger tokenizer would emit ids that collide with
``[IMG]`` and the keyframe codes, a smaller one means the wrong tokenizer directory.

The LLM stages' exports add the four block markers as named special tokens at their vocabulary ids
(``with_block_markers``), so that ``convert_tokens_to_ids("[MOV]")`` and ``decode`` agree with the model's
rows; no merge produces them, so text ids do not change, and a literal "[IMG]" typed by a user stays text.
Loading accepts tokenizers with or without the markers (exports written before them still load).

Nothing here touches the network: ``AutoTokenizer`` is called with ``local_files_only=True``.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterable
from pathlib import Path

from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from videolavit.llm.vocabulary import Vocabulary

# Llama's special tokens and ids; the tiny tokenizer copies them so code paths are identical.
UNK_TOKEN, BOS_TOKEN, EOS_TOKEN = "<unk>", "<s>", "</s>"
UNK_ID, BOS_ID, EOS_ID = 0, 1, 2
# Names of the block markers, in the order of ``Vocabulary.special_ids``.
BLOCK_MARKERS = ("[IMG]", "[/IMG]", "[MOV]", "[/MOV]")


class TokenizerMismatchError(ValueError):
    """The tokenizer in a directory does not fit the vocabulary layout it is used with."""


def block_marker_ids(vocab: Vocabulary) -> dict[str, int]:
    """Names of the four block markers and their ids in ``vocab``."""
    return dict(zip(BLOCK_MARKERS, vocab.special_ids))


def check_text_ids(tokenizer: PreTrainedTokenizerBase, vocab: Vocabulary, where: str = "the tokenizer") -> None:
    """Raise ``TokenizerMismatchError`` unless ``tokenizer`` has exactly the text ids [0, text_size), plus
    (optionally) the block markers at exactly their ids and nothing else."""
    markers = block_marker_ids(vocab)
    ids = tokenizer.get_vocab()
    for name, wanted in markers.items():
        if name in ids and ids[name] != wanted:
            raise TokenizerMismatchError(f"{where} maps {name} to {ids[name]} but the vocabulary puts it at {wanted}")
    text_ids = {i for token, i in ids.items() if token not in markers}
    stray = sorted(i for i in text_ids if i >= vocab.text_size)
    if stray or len(text_ids) != vocab.text_size:
        raise TokenizerMismatchError(
            f"{where} has {len(text_ids)} text ids{f' (some from {stray[0]} up)' if stray else ''} but the "
            f"vocabulary's text size is {vocab.text_size}; its ids would not line up with "
            f"[IMG]={vocab.image_start_id}")


def with_block_markers(tokenizer: PreTrainedTokenizerBase, vocab: Vocabulary) -> PreTrainedTokenizerBase:
    """A copy of ``tokenizer`` with ``[IMG]`` ``[/IMG]`` ``[MOV]`` ``[/MOV]`` as special tokens at their ``vocab`` ids.

    Needs a fast tokenizer with a BPE model (Llama's and the tiny one): its vocabulary is a name -> id map
    that may skip ids (the keyframe codes between ``[/IMG]`` and ``[MOV]``). Idempotent.

    ``[IMG]`` is ``text_size``, then ``[/IMG]``; ``[MOV]`` lies past the keyframe codes, which have no names, so
    the markers (and any added token already there) are entered in the BPE model's vocabulary with their ids (an
    added-token table can only append ids) and registered as special tokens on top. No merge produces them, so
    text ids do not change; with ``split_special_tokens=True`` (what ``conversation`` uses) a literal "[IMG]"
    typed by a user stays text.
    """
    check_text_ids(tokenizer, vocab)
    markers = block_marker_ids(vocab)
    backend = json.loads(tokenizer.backend_tokenizer.to_str())
    model = backend.get("model", {})
    if model.get("type") != "BPE" or not isinstance(model.get("vocab"), dict):
        raise TokenizerMismatchError(f"cannot give the block markers their ids in a {model.get('type')} tokenizer "
                                     "(a BPE tokenizer is needed)")
    added = {entry["content"]: entry for entry in backend.get("added_tokens", [])}
    # Pin every added token's id in the model's vocabulary: an added-token table renumbers its entries
    # from the model's size, which the markers change.
    for name, entry in added.items():
        model["vocab"].setdefault(name, entry["id"])
    for name, token_id in markers.items():
        model["vocab"][name] = token_id
        added[name] = {"id": token_id, "content": name, "single_word": False, "lstrip": False, "rstrip": False,
                       "normalized": False, "special": True}
    backend["added_tokens"] = sorted(added.values(), key=lambda entry: entry["id"])
    from tokenizers import Tokenizer

    out = copy.deepcopy(tokenizer)
    # The backend swapped in place keeps the tokenizer's own class and settings (a Llama tokenizer stays one).
    out._tokenizer = Tokenizer.from_str(json.dumps(backend))
    existing = getattr(out, "extra_special_tokens", None) or getattr(out, "additional_special_tokens", None) or []
    if isinstance(existing, dict):
        existing = list(existing.values())
    names = [str(t) for t in existing if str(t) not in markers] + list(markers)
    out.add_special_tokens({"additional_special_tokens": names})
    got = out.convert_tokens_to_ids(list(markers))
    if got != list(markers.values()):
        raise TokenizerMismatchError(f"block markers came out at {got} instead of {list(markers.values())}")
    before = {t: i for t, i in tokenizer.get_vocab().items() if t not in markers}
    if {t: i for t, i in out.get_vocab().items() if t not in markers} != before:
        raise TokenizerMismatchError("adding the block markers changed text ids")
    return out


def load_text_tokenizer(directory: str | Path, vocab: Vocabulary | None = None) -> PreTrainedTokenizerBase:
    """Load the tokenizer in ``directory`` (no downloads) and check it against ``vocab``.

    The tokenizer must be a fast tokenizer (offsets are needed to mask conversation turns), define bos
    and eos, and have exactly ``vocab.text_size`` ids. A missing pad token is set to unk, as LLaVA and
    the release's understanding runner do for Llama. The block markers may be there, at their ids.
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
    if vocab is not None:
        check_text_ids(tokenizer, vocab, where=f"tokenizer in {directory}")
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


# transformers 5 names its generic fast tokenizer "TokenizersBackend" and lists extra special tokens under
# "extra_special_tokens"; transformers 4.x knows neither. The names both read:
PORTABLE_TOKENIZER_CLASS = "PreTrainedTokenizerFast"


def save_portable_tokenizer(tokenizer, directory: str | Path) -> None:
    """``save_pretrained``, then a ``tokenizer_config.json`` that transformers 4.x and 5.x both load."""
    tokenizer.save_pretrained(str(directory))
    path = Path(directory) / "tokenizer_config.json"
    config = json.loads(path.read_text())
    if config.get("tokenizer_class") == "TokenizersBackend":
        config["tokenizer_class"] = PORTABLE_TOKENIZER_CLASS
    extra = config.pop("extra_special_tokens", None)
    if isinstance(extra, list):
        config["additional_special_tokens"] = list(dict.fromkeys([*config.get("additional_special_tokens", []),
                                                                  *extra]))
    elif extra is not None:
        config["extra_special_tokens"] = extra
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
