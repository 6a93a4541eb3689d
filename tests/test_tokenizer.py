"""Tokenizer: golden ids from the reference tokenizer, both file layouts, special tokens, errors."""

import json
import shutil

import pytest

from bagel.errors import CheckpointError
from bagel.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def golden_items(golden_dir):
    cases = json.loads((golden_dir / "golden" / "cases.json").read_text())["cases"]
    return next(c for c in cases if c["id"] == "tokenize")["expected"]["items"]


@pytest.fixture
def slow_layout(tmp_path, golden_dir):
    """The folder without tokenizer.json: vocab.json + merges.txt + tokenizer_config.json."""
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json"):
        shutil.copy(golden_dir / name, tmp_path / name)
    return tmp_path


@pytest.mark.parametrize("layout", ["tokenizer_json", "vocab_merges"])
def test_encode_and_decode_match_reference(layout, golden_dir, slow_layout, golden_items):
    tok = Tokenizer.from_dir(golden_dir if layout == "tokenizer_json" else slow_layout)
    for item in golden_items:
        assert tok.encode(item["text"]) == item["encode_ids"], item["text"]
        assert tok.decode(item["encode_ids"]) == item["decoded"]


def test_special_token_ids_and_length(golden_dir):
    tok = Tokenizer.from_dir(golden_dir)
    assert (tok.bos_id, tok.eos_id, tok.start_of_image_id, tok.end_of_image_id) == (481, 482, 483, 484)
    assert len(tok) == 485


def test_literal_special_tokens_in_text_map_to_their_ids(golden_dir):
    tok = Tokenizer.from_dir(golden_dir)
    assert tok.encode("<|im_start|>") == [tok.bos_id]
    assert tok.decode([tok.bos_id, tok.eos_id]) == "<|im_start|><|im_end|>"


def test_invalid_utf8_decodes_to_replacement_character(golden_dir):
    tok = Tokenizer.from_dir(golden_dir)
    e_acute_first_byte = tok.encode("é")[0]  # "Ã" symbol: the byte 0xC3 alone is not valid UTF-8
    assert tok.decode([e_acute_first_byte]) == "\ufffd"


def test_missing_files_name_the_file(tmp_path):
    with pytest.raises(CheckpointError, match=r"vocab\.json: tokenizer file is missing"):
        Tokenizer.from_dir(tmp_path)


def test_missing_special_token_is_a_checkpoint_error(slow_layout):
    (slow_layout / "tokenizer_config.json").write_text(json.dumps({"added_tokens_decoder": {}}))
    with pytest.raises(CheckpointError, match=r"special token '<\|im_start\|>' is not in the tokenizer"):
        Tokenizer.from_dir(slow_layout)


def test_malformed_merges_line_is_reported(slow_layout):
    (slow_layout / "merges.txt").write_text("#version: 0.2\nonly-one-symbol\n")
    with pytest.raises(CheckpointError, match=r"merges\.txt:2: expected two symbols"):
        Tokenizer.from_dir(slow_layout)
