"""Write a randomly initialised HF model directory (Llama, Qwen2 or GPT-2 architecture) with a byte-level BPE
tokenizer trained here and a chat template, so `policy.model: DIR` can be tested on real architectures with no
hub download.

    python -m outrider.policy.random_model DIR --arch qwen2 --hidden 64 --layers 2 --heads 4

The directory is what `save_pretrained` writes (config.json, model.safetensors, tokenizer.json,
tokenizer_config.json with its chat template): `AutoModelForCausalLM.from_pretrained(DIR)` and
`AutoTokenizer.from_pretrained(DIR)` load it like a hub model. The chat templates follow the families' formats:
ChatML (``<|im_start|>role ... <|im_end|>``, EOS ``<|im_end|>``) for Qwen2, Llama 3's header tokens (EOS
``<|eot_id|>``) for Llama, and none for GPT-2 (plain text, EOS ``<|endoftext|>``), so both of `Policy`'s
observation encodings are exercised.
"""

from __future__ import annotations

import argparse
import string
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (AutoModelForCausalLM, GPT2Config, LlamaConfig, PreTrainedModel, PreTrainedTokenizerFast,
                          Qwen2Config)

from outrider.errors import OutriderError

ARCHITECTURES = ("llama", "qwen2", "gpt2")

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
LLAMA3 = ("{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
          "{{ m['content'] }}<|eot_id|>{% endfor %}"
          "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")
# special tokens per family: (bos, eos, pad, extra specials, chat template)
FAMILY = {
    "qwen2": (None, "<|im_end|>", "<|endoftext|>", ["<|im_start|>"], CHATML),
    "llama": ("<|begin_of_text|>", "<|eot_id|>", "<|finetune_right_pad_id|>",
              ["<|start_header_id|>", "<|end_header_id|>"], LLAMA3),
    "gpt2": ("<|endoftext|>", "<|endoftext|>", "<|endoftext|>", [], None),
}


def default_corpus() -> list[str]:
    """Text the BPE merges are learned from: arithmetic, words and the ASCII alphabet (byte-level BPE encodes any
    text whatever it was trained on; the corpus only decides which merges exist)."""
    words = ("the a to of and is in it you that go left right up down forward pick key door open answer sum "
             "reverse word step turn toward room take look inventory north south east west").split()
    lines = [f"{a} + {b} = {a + b}" for a in range(0, 40, 3) for b in range(0, 30, 7)]
    lines += [" ".join(words[i:] + words[:i]) for i in range(len(words))]
    lines += [string.printable, "".join(reversed(string.ascii_lowercase))]
    return lines


def train_tokenizer(arch: str, vocab_size: int = 512, corpus: list[str] | None = None) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer (GPT-2/Llama 3/Qwen2 style) trained on `corpus`, with the family's specials."""
    bos, eos, pad, extra, template = FAMILY[arch]
    specials = list(dict.fromkeys([t for t in (bos, eos, pad) if t] + extra))
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    core.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    core.train_from_iterator(corpus or default_corpus(), trainer=trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=core, bos_token=bos, eos_token=eos, pad_token=pad,
                                  additional_special_tokens=extra or None)
    if template:
        tok.chat_template = template
    return tok


def build_model(arch: str, vocab_size: int, hidden: int, layers: int, heads: int, kv_heads: int | None,
                max_positions: int, tokenizer: PreTrainedTokenizerFast, seed: int) -> PreTrainedModel:
    """A randomly initialised causal LM of `arch` (seeded: the same arguments give the same weights)."""
    ids = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
               pad_token_id=tokenizer.pad_token_id)
    if arch == "gpt2":
        config = GPT2Config(vocab_size=vocab_size, n_embd=hidden, n_layer=layers, n_head=heads,
                            n_positions=max_positions, **ids)
    else:
        cls = LlamaConfig if arch == "llama" else Qwen2Config
        config = cls(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
                     num_attention_heads=heads, num_key_value_heads=kv_heads or heads,
                     max_position_embeddings=max_positions, tie_word_embeddings=True, **ids)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


def write_model_dir(path: str | Path, arch: str = "qwen2", hidden: int = 64, layers: int = 2, heads: int = 4,
                    kv_heads: int | None = None, vocab_size: int = 512, max_positions: int = 512, seed: int = 0,
                    corpus: list[str] | None = None) -> Path:
    """Write a random `arch` model and its trained tokenizer to `path`; return the path."""
    if arch not in ARCHITECTURES:
        raise OutriderError(f"arch: '{arch}' is not one of {', '.join(ARCHITECTURES)}")
    if hidden % heads or (arch != "gpt2" and (hidden // heads) % 2):
        raise OutriderError(f"hidden: {hidden} must be a multiple of heads={heads} with an even head size")
    tokenizer = train_tokenizer(arch, vocab_size, corpus)
    model = build_model(arch, len(tokenizer), hidden, layers, heads, kv_heads, max_positions, tokenizer, seed)
    path = Path(path)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m outrider.policy.random_model", description=__doc__.split("\n")[0])
    ap.add_argument("out", help="directory to write")
    ap.add_argument("--arch", choices=ARCHITECTURES, default="qwen2")
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--kv-heads", type=int, default=None, help="grouped-query KV heads (Llama/Qwen2)")
    ap.add_argument("--vocab", type=int, default=512, help="BPE vocabulary size (specials included)")
    ap.add_argument("--max-positions", type=int, default=512)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    path = write_model_dir(a.out, a.arch, a.hidden, a.layers, a.heads, a.kv_heads, a.vocab, a.max_positions, a.seed)
    n = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(path).parameters())
    print(f"wrote a random {a.arch} model ({n / 1e6:.2f}M parameters) and its tokenizer to {path}")


if __name__ == "__main__":
    main()
