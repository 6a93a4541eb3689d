"""Builder of the tiny byte-level BPE tokenizer that ``tiny.py`` ships with its checkpoints.

Owns: a small built-in English corpus (generated from word lists, no download), training a
byte-level BPE on it with Qwen2's normaliser and pre-tokenisation, registering the Qwen special
tokens the way the real checkpoint does, and writing the four tokenizer files of the real layout
(``vocab.json``, ``merges.txt``, ``tokenizer_config.json``, ``tokenizer.json``). Reading them
back is ``tokenizer.py``'s job.

The result has the same structure as Qwen2's tokenizer (256 byte symbols, merges, then the added
special tokens right after the vocabulary), only with a few hundred merges instead of 151k, so
every code path that handles real text (multi-byte characters, literal special tokens) is
exercised by tests that run anywhere.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, trainers
from tokenizers import Tokenizer as _HFTokenizer

from bagel.tokenizer import (
    BOS_TOKEN,
    END_OF_IMAGE_TOKEN,
    EOS_TOKEN,
    QWEN2_SPLIT_PATTERN,
    START_OF_IMAGE_TOKEN,
)

PAD_TOKEN = "<|endoftext|>"
# Added after the vocabulary in this order, as in Qwen2.5 (151643 … 151653 there).
SPECIAL_TOKENS = (PAD_TOKEN, BOS_TOKEN, EOS_TOKEN, START_OF_IMAGE_TOKEN, END_OF_IMAGE_TOKEN)
N_BYTE_SYMBOLS = 256

_SUBJECTS = ("a red circle", "the blue square", "a small dog", "three birds", "an old car",
             "the green hills", "a quiet village", "a yellow star", "the tall tower", "two cats",
             "a wooden chair", "the bright moon", "a purple flower", "the white boat", "a child")
_VERBS = ("sits on", "flies over", "stands near", "looks at", "rests under", "is next to",
          "moves toward", "shines above", "hides behind", "waits beside")
_PLACES = ("the mountains", "a sunny beach", "the city street", "a snowy field", "the river",
           "a dark forest", "the kitchen table", "a calm lake", "the garden", "the desert")
_STYLES = ("at sunset", "in the morning", "under soft light", "in watercolor", "as a photo",
           "in the rain", "at night", "with long shadows", "in winter", "on a clear day")
_QUESTIONS = ("What color is the {s}?", "How many shapes are in the picture?",
              "Where is {s}?", "Describe {s} in one sentence.", "Is there {s} in the image?")


def corpus_lines(n_lines: int = 600) -> list[str]:
    """Deterministic English-like training lines (prompts, captions, questions)."""
    rng = random.Random(1234)
    lines = []
    for _ in range(n_lines):
        kind = rng.random()
        subject = rng.choice(_SUBJECTS)
        if kind < 0.6:
            line = f"{subject.capitalize()} {rng.choice(_VERBS)} {rng.choice(_PLACES)} {rng.choice(_STYLES)}."
        elif kind < 0.85:
            line = rng.choice(_QUESTIONS).format(s=subject.split(" ", 1)[1])
        else:
            line = f"Turn {subject} into {rng.choice(_SUBJECTS)} and make it {rng.randint(2, 9)} times larger."
        lines.append(line)
    return lines


def train_tokenizer(n_merges: int) -> _HFTokenizer:
    """A byte-level BPE with up to ``n_merges`` merges and the special tokens appended."""
    tok = _HFTokenizer(models.BPE(fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=N_BYTE_SYMBOLS + n_merges, min_frequency=2,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=[], show_progress=False)
    tok.train_from_iterator(corpus_lines(), trainer=trainer)
    tok.add_special_tokens([AddedToken(t, single_word=False, lstrip=False, rstrip=False,
                                       normalized=False, special=True) for t in SPECIAL_TOKENS])
    return tok


def _tokenizer_config(tok: _HFTokenizer) -> dict:
    added = {}
    for content in SPECIAL_TOKENS:
        added[str(tok.token_to_id(content))] = {
            "content": content, "lstrip": False, "normalized": False, "rstrip": False,
            "single_word": False, "special": True,
        }
    return {
        "add_prefix_space": False,
        "added_tokens_decoder": added,
        "additional_special_tokens": [BOS_TOKEN, EOS_TOKEN, START_OF_IMAGE_TOKEN, END_OF_IMAGE_TOKEN],
        "bos_token": None,
        "clean_up_tokenization_spaces": False,
        "eos_token": EOS_TOKEN,
        "errors": "replace",
        "model_max_length": 131072,
        "pad_token": PAD_TOKEN,
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }


def write_tokenizer(folder: Path, n_merges: int) -> int:
    """Train and write the four tokenizer files into ``folder``; returns the number of tokens
    including the special ones (the model's vocab_size must be at least that)."""
    tok = train_tokenizer(n_merges)
    vocab = tok.get_vocab(with_added_tokens=False)
    ordered = dict(sorted(vocab.items(), key=lambda kv: kv[1]))
    (folder / "vocab.json").write_text(json.dumps(ordered, ensure_ascii=False), encoding="utf-8")
    merges = json.loads(tok.to_str())["model"]["merges"]
    lines = ["#version: 0.2"] + [" ".join(m) if isinstance(m, list) else m for m in merges]
    (folder / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (folder / "tokenizer_config.json").write_text(json.dumps(_tokenizer_config(tok), indent=2) + "\n")
    tok.save(str(folder / "tokenizer.json"))
    return tok.get_vocab_size(with_added_tokens=True)
