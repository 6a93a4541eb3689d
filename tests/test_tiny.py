"""The tiny-checkpoint maker: real layout, strict load, determinism, tokenizer round trip."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from bagel.config import ModelConfig
from bagel.errors import InputError
from bagel.loading import load_checkpoint
from bagel.tiny import SIZES, make_tiny
from bagel.tokenizer import Tokenizer

LAYOUT = {"llm_config.json", "vit_config.json", "ae_config.json", "ema.safetensors", "ae.safetensors",
          "vocab.json", "merges.txt", "tokenizer_config.json", "tokenizer.json"}


@pytest.fixture(scope="module")
def made(tmp_path_factory) -> Path:
    return make_tiny(tmp_path_factory.mktemp("tiny") / "ckpt", seed=7)


def _shapes(path: Path) -> dict[str, list[int]]:
    with safe_open(str(path), framework="pt") as handle:
        return {k: list(handle.get_slice(k).get_shape()) for k in handle.keys()}


def test_writes_the_full_real_layout(made):
    assert {p.name for p in made.iterdir()} == LAYOUT
    assert not list(made.parent.glob(".*partial*"))
    vit = json.loads((made / "vit_config.json").read_text())
    assert vit["num_hidden_layers"] == 3  # stored N+1, BAGEL uses 2
    assert ModelConfig.from_folder(made).vit.num_hidden_layers == 2
    llm = json.loads((made / "llm_config.json").read_text())
    assert llm["model_type"] == "qwen2" and llm["vocab_size"] % 64 == 0


def test_tiny_has_exactly_the_golden_fixtures_tensor_names_and_shapes(made, golden_dir):
    for filename in ("ema.safetensors", "ae.safetensors"):
        assert _shapes(made / filename) == _shapes(golden_dir / filename)


def test_loads_strictly_and_keeps_the_exact_sincos_tables(made, golden_dir):
    ckpt = load_checkpoint(made)
    assert all(t.device.type == "cpu" for t in ckpt.model.parameters())
    with safe_open(str(golden_dir / "ema.safetensors"), framework="pt") as golden:
        for name in ("vit_pos_embed", "latent_pos_embed"):
            table = getattr(ckpt.model, name).pos_embed
            assert torch.equal(table, golden.get_tensor(f"{name}.pos_embed"))


def test_same_seed_gives_identical_bytes_and_another_seed_differs(made, tmp_path):
    again = make_tiny(tmp_path / "again", seed=7)
    for name in LAYOUT:
        assert (again / name).read_bytes() == (made / name).read_bytes(), name
    other = make_tiny(tmp_path / "other", seed=8)
    assert (other / "ema.safetensors").read_bytes() != (made / "ema.safetensors").read_bytes()
    assert (other / "vocab.json").read_bytes() == (made / "vocab.json").read_bytes()


def test_init_follows_the_documented_recipe(made):
    ckpt = load_checkpoint(made)
    tok = ckpt.tokenizer
    head = ckpt.model.language_model.lm_head.weight
    assert torch.count_nonzero(head[len(tok):]) == 0  # padded rows
    norms = head.norm(dim=1)
    assert norms[tok.eos_id] > norms[tok.bos_id] * 3  # <|im_end|> boosted, <|im_start|> damped
    layer = ckpt.model.language_model.model.layers[0]
    assert 2.5 < layer.self_attn.q_norm.weight.mean() < 3.5
    assert 0.8 < layer.input_layernorm.weight.mean() < 1.2


def test_tokenizer_round_trips_text_and_special_tokens(made):
    tok = Tokenizer.from_dir(made)
    assert (tok.bos_id, tok.eos_id, tok.start_of_image_id, tok.end_of_image_id) == (
        len(tok) - 4, len(tok) - 3, len(tok) - 2, len(tok) - 1)
    text = "A red circle, Ünïcödé 日本語 🙂\n\tspaces  <|vision_start|>"
    ids = tok.encode(text)
    assert ids[-1] == tok.start_of_image_id
    assert tok.decode(ids) == text
    assert len(tok.encode("the red circle")) < len("the red circle")  # merges were learned


def test_vocab_and_merges_give_the_same_ids_as_tokenizer_json(made, tmp_path):
    slow = tmp_path / "slow"
    slow.mkdir()
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json"):
        (slow / name).write_bytes((made / name).read_bytes())
    text = "How many shapes are in the picture? <|im_end|> ünï"
    assert Tokenizer.from_dir(slow).encode(text) == Tokenizer.from_dir(made).encode(text)


def test_refuses_bad_arguments_and_a_non_empty_folder(made, tmp_path):
    with pytest.raises(InputError, match=r"size: 'huge' is not one of \['small', 'tiny'\]"):
        make_tiny(tmp_path / "x", size="huge")
    with pytest.raises(InputError, match="already exists and is not an empty directory"):
        make_tiny(made)
    empty = tmp_path / "empty"
    empty.mkdir()
    assert make_tiny(empty) == empty


def test_small_preset_is_qwen2_shaped():
    small = SIZES["small"]
    assert small.hidden // small.heads == 64
    assert small.heads % small.kv_heads == 0
    assert small.ae_ch_mult == (1, 2, 4, 4)


def test_min_side_px_writes_bagel_config_and_edits_keep_small_pictures(tmp_path):
    from PIL import Image

    from bagel.config import GenerationParams
    from bagel.engine import Engine
    from bagel.requests import Request

    folder = make_tiny(tmp_path / "small-sides", seed=3, min_side_px=64)
    assert json.loads((folder / "bagel_config.json").read_text()) == {"vae_min_px": 64, "vit_min_px": 64}
    assert ModelConfig.from_folder(folder).constants.vae_min_px == 64
    engine = Engine.load(folder, device="cpu")
    picture = Image.new("RGB", (80, 64), (200, 40, 40))
    [result] = engine.run([Request(task="edit", prompt="make it blue", images=[picture],
                                   params=GenerationParams.for_task("edit", num_timesteps=2, seed=1))])
    assert result.image.size == (80, 64)  # the reference rule would have resized it to 640x512


def test_bagel_config_rejects_unknown_fields(tmp_path):
    from bagel.errors import CheckpointError

    folder = make_tiny(tmp_path / "bad", seed=3, min_side_px=64)
    (folder / "bagel_config.json").write_text(json.dumps({"vae_min_side": 64}))
    with pytest.raises(CheckpointError, match=r"bagel_config.json: unknown fields \['vae_min_side'\]"):
        ModelConfig.from_folder(folder)
