"""Text tokenizer: Qwen2's byte-level BPE plus the special tokens BAGEL relies on.

Owns: reading the tokenizer files of a checkpoint folder (``tokenizer.json`` when present,
otherwise ``vocab.json`` + ``merges.txt`` with Qwen2's pre-tokenisation), the added special
tokens from ``tokenizer_config.json``, ``encode``/``decode`` and the ids of the four tokens
the model uses (``<|im_start|>``, ``<|im_end|>``, ``<|vision_start|>``, ``<|vision_end|>``).
Leaves prompt framing (``<|im_start|>`` + ids + ``<|im_end|>``) to ``packing.py``.

Built on the ``tokenizers`` library (not transformers). Departures from the reference: none
in behaviour — ``encode`` adds no BOS/EOS, literal special-token strings in the text map to
their ids (Qwen2's ``split_special_tokens=False``), ``decode`` keeps special tokens and
replaces invalid UTF-8 with U+FFFD.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers
from tokenizers import Tokenizer as _HFTokenizer

from bagel.errors import CheckpointError

logger = logging.getLogger(__name__)

# Qwen2's pre-tokenisation pattern (contractions, letter runs, single digits, punctuation runs,
# newlines, whitespace), as published in Qwen2's tokenizer.json.
QWEN2_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

BOS_TOKEN = "<|im_start|>"
EOS_TOKEN = "<|im_end|>"
START_OF_IMAGE_TOKEN = "<|vision_start|>"
END_OF_IMAGE_TOKEN = "<|vision_end|>"
REQUIRED_TOKENS = (BOS_TOKEN, EOS_TOKEN, START_OF_IMAGE_TOKEN, END_OF_IMAGE_TOKEN)


def _build_from_vocab_merges(folder: Path) -> _HFTokenizer:
    vocab_path, merges_path = folder / "vocab.json", folder / "merges.txt"
    for path in (vocab_path, merges_path):
        if not path.is_file():
            raise CheckpointError(f"{path}: tokenizer file is missing (and there is no tokenizer.json)")
    try:
        vocab = json.loads(vocab_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{vocab_path}: not valid JSON ({exc})") from exc
    merges = []
    for lineno, line in enumerate(merges_path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line or line.startswith("#version"):
            continue
        parts = line.split(" ")
        if len(parts) != 2:
            raise CheckpointError(f"{merges_path}:{lineno}: expected two symbols, got {line!r}")
        merges.append((parts[0], parts[1]))
    tok = _HFTokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    return tok


def _added_tokens_from_config(folder: Path) -> list[tuple[int, AddedToken]]:
    path = folder / "tokenizer_config.json"
    if not path.is_file():
        return []
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path}: not valid JSON ({exc})") from exc
    out = []
    for key, spec in sorted(raw.get("added_tokens_decoder", {}).items(), key=lambda kv: int(kv[0])):
        out.append((int(key), AddedToken(
            spec["content"], single_word=spec.get("single_word", False),
            lstrip=spec.get("lstrip", False), rstrip=spec.get("rstrip", False),
            normalized=spec.get("normalized", False), special=spec.get("special", True))))
    return out


class Tokenizer:
    """Qwen2 byte-level BPE with BAGEL's special tokens, looked up by name."""

    def __init__(self, backend: _HFTokenizer, source: str = "<memory>") -> None:
        self._tok = backend
        self._source = source
        ids = {}
        for name in REQUIRED_TOKENS:
            tid = backend.token_to_id(name)
            if tid is None:
                raise CheckpointError(f"{source}: special token {name!r} is not in the tokenizer")
            ids[name] = tid
        self._ids = ids

    @classmethod
    def from_dir(cls, folder: str | Path) -> Tokenizer:
        """Read the tokenizer files of a checkpoint folder (see module docstring)."""
        folder = Path(folder)
        fast = folder / "tokenizer.json"
        if fast.is_file():
            try:
                backend = _HFTokenizer.from_file(str(fast))
            except Exception as exc:  # the library raises a bare Exception on malformed files
                raise CheckpointError(f"{fast}: cannot be read as a tokenizer ({exc})") from exc
            source = str(fast)
        else:
            backend = _build_from_vocab_merges(folder)
            source = str(folder / "vocab.json")
        added = _added_tokens_from_config(folder)
        for tid, token in added:
            existing = backend.token_to_id(token.content)
            if existing is None:
                backend.add_special_tokens([token])
                existing = backend.token_to_id(token.content)
            if existing != tid:
                raise CheckpointError(f"{folder / 'tokenizer_config.json'}: token {token.content!r} "
                                      f"should have id {tid} but the vocabulary gives {existing}")
        logger.info("tokenizer loaded from %s: %d tokens", source, backend.get_vocab_size(with_added_tokens=True))
        return cls(backend, source)

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``, no BOS/EOS added; literal special-token strings map to their ids."""
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        """Text of ``ids`` with special tokens kept; invalid UTF-8 becomes U+FFFD."""
        return self._tok.decode(list(ids), skip_special_tokens=False)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    @property
    def bos_id(self) -> int:
        return self._ids[BOS_TOKEN]

    @property
    def eos_id(self) -> int:
        return self._ids[EOS_TOKEN]

    @property
    def start_of_image_id(self) -> int:
        return self._ids[START_OF_IMAGE_TOKEN]

    @property
    def end_of_image_id(self) -> int:
        return self._ids[END_OF_IMAGE_TOKEN]

    def __len__(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)
