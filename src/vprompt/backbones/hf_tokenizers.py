"""Tokenizers for transformers detectors built without the hub.

Hub checkpoints carry their tokenizer files; a random-init build (``--weights none``) has
none, so it gets the tokenizer the released models use, built from files that install with
the packages: CLIP's byte-level BPE from open_clip's bundled vocabulary (OWL-ViT, OWLv2,
CLIPSeg and SAM 3 all use it), and a WordPiece vocabulary for BERT-style text towers
(Grounding DINO) built from the same BPE's word list.
"""

from __future__ import annotations

import functools
import gzip
import importlib.util
from pathlib import Path
from typing import Any

from vprompt.errors import WeightsError

# CLIP's BPE: 49152 - 256 - 2 merges after the header line (OpenAI's SimpleTokenizer).
_N_MERGES = 49152 - 256 - 2


def _bpe_file() -> Path:
    # Found without importing open_clip, whose import (torch, timm …) takes seconds.
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise WeightsError("CLIP's BPE vocabulary ships with open_clip, which is not installed")
    return Path(next(iter(spec.submodule_search_locations))) / "bpe_simple_vocab_16e6.txt.gz"


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte → printable-character table (CLIP's BPE alphabet)."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in chars), strict=True))


@functools.cache
def _clip_vocab() -> tuple[dict[str, int], tuple[str, ...]]:
    with gzip.open(_bpe_file(), "rt", encoding="utf-8") as fh:
        lines = fh.read().split("\n")
    merges = tuple(lines[1 : _N_MERGES + 1])
    alphabet = list(_bytes_to_unicode().values())
    tokens = alphabet + [c + "</w>" for c in alphabet]
    tokens += ["".join(m.split()) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {t: i for i, t in enumerate(tokens)}, merges


def clip_tokenizer(*, max_length: int = 77) -> Any:
    """transformers' ``CLIPTokenizer`` with CLIP's released vocabulary (49408 tokens)."""
    import transformers as tf

    vocab, merges = _clip_vocab()
    pairs = [tuple(m.split()) for m in merges]
    # The tokenizers backend takes merges as pairs (its stub says strings).
    return tf.CLIPTokenizer(vocab=dict(vocab), merges=pairs, model_max_length=max_length)  # type: ignore[arg-type]


@functools.cache
def _wordpiece_vocab() -> tuple[str, ...]:
    """BERT's special tokens, single characters, then whole words from CLIP's merges."""
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    chars = [chr(c) for c in range(33, 127)]
    pieces = ["##" + c for c in chars]
    words: list[str] = []
    seen = set(specials + chars)
    for merge in _clip_vocab()[1]:
        word = "".join(merge.split())
        if word.endswith("</w>"):
            word = word[: -len("</w>")]
            if word.isalpha() and word.isascii() and word.lower() == word and word not in seen:
                seen.add(word)
                words.append(word)
    return tuple(specials + chars + pieces + words)


def wordpiece_tokenizer(*, max_length: int = 256) -> Any:
    """A lower-casing BERT WordPiece tokenizer over :func:`_wordpiece_vocab` (for random-init
    BERT-style text towers; released models load their own ``bert-base-uncased`` files)."""
    import transformers as tf

    vocab = {t: i for i, t in enumerate(_wordpiece_vocab())}
    return tf.BertTokenizer(vocab=vocab, do_lower_case=True, model_max_length=max_length)


def wordpiece_vocab_size() -> int:
    return len(_wordpiece_vocab())
