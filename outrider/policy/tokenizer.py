"""The built-in character-level tokenizer: a `PreTrainedTokenizerFast`, so `AutoTokenizer.from_pretrained` loads it."""

from __future__ import annotations

import string

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

SPECIAL_TOKENS = {"pad_token": "<pad>", "bos_token": "<bos>", "eos_token": "<eos>", "unk_token": "<unk>"}
CHARACTERS = "\n" + "".join(chr(c) for c in range(32, 127))


def build_char_tokenizer(extra_characters: str = "") -> PreTrainedTokenizerFast:
    """One token per character (printable ASCII, newline, and `extra_characters`) plus pad/bos/eos/unk."""
    chars = list(dict.fromkeys(CHARACTERS + extra_characters))
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS.values())}
    for ch in chars:
        vocab.setdefault(ch, len(vocab))
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=SPECIAL_TOKENS["unk_token"]))
    # Every character (newline included) is its own pre-token; decoding concatenates with no separator.
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    core.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, **SPECIAL_TOKENS)
    tok.padding_side = "left"
    return tok


assert set(string.digits) <= set(CHARACTERS)
