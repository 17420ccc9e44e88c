"""A word-level tokenizer over the testbed's closed prompt vocabulary.

It needs no download: the vocabulary is the list of words the dataset writes
(``dataset.PROMPT_WORDS``). It follows the T5 conventions the Wan pipeline expects from
its UMT5 tokenizer: ``<pad>`` = 0, ``</s>`` = 1 appended to every sequence (the pipeline
calls it with ``add_special_tokens=True``), ``<unk>`` = 2, lower-casing, and padding to
``max_length`` (the pipeline asks for ``max_sequence_length``, 512 by default).
"""

from __future__ import annotations

from typing import Iterable

from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import WordLevel
from transformers import PreTrainedTokenizerFast

from .dataset import PROMPT_WORDS

PAD, EOS, UNK = "<pad>", "</s>", "<unk>"
SPECIAL_TOKENS: tuple[str, ...] = (PAD, EOS, UNK)
DEFAULT_MAX_LENGTH = 512


def build_vocab(words: Iterable[str] = PROMPT_WORDS) -> dict[str, int]:
    """Token ids: the special tokens first (T5 order), then the words in given order."""
    vocab: dict[str, int] = {}
    for token in (*SPECIAL_TOKENS, *words):
        vocab.setdefault(token.lower(), len(vocab))
    return vocab


def build_backend(words: Iterable[str] = PROMPT_WORDS) -> Tokenizer:
    """The raw ``tokenizers`` object: lowercase, split on whitespace, append ``</s>``."""
    vocab = build_vocab(words)
    tok = Tokenizer(WordLevel(vocab=vocab, unk_token=UNK))
    tok.normalizer = normalizers.Lowercase()
    # Whitespace-only splitting keeps hyphenated words ("up-left") whole, so decoding
    # (which joins tokens with spaces) gives back the prompt exactly.
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(
        single=f"$A {EOS}", pair=f"$A {EOS} $B {EOS}", special_tokens=[(EOS, vocab[EOS])]
    )
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with spaces
    return tok


def build_tokenizer(max_length: int = DEFAULT_MAX_LENGTH, words: Iterable[str] = PROMPT_WORDS) -> PreTrainedTokenizerFast:
    """The tokenizer wrapped for transformers/diffusers (``save_pretrained``-able)."""
    return PreTrainedTokenizerFast(
        tokenizer_object=build_backend(words),
        pad_token=PAD,
        eos_token=EOS,
        unk_token=UNK,
        model_max_length=max_length,
        padding_side="right",
    )
