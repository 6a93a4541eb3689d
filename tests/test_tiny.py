"""The random-checkpoint maker: real layout, strict load, determinism, tokenizer round trip, the
``full`` preset's real BAGEL-7B-MoT shapes, and the streamed safetensors writer."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from bagel.config import LLMConfig, ModelConfig, VAEConfig, ViTConfig
from bagel.errors import InputError
from bagel.loading import (AE_NAME_MAP, EMA_NAME_MAP, build_empty, load_checkpoint, paper_weight_bytes,
                           tensor_slots, to_checkpoint_key)
from bagel.safetensors_writer import data_bytes, safetensors_header, write_safetensors
from bagel.tiny import SIZES, RandomWeights, make_tiny, preset_config
from bagel.tokenizer import Tokenizer

ROOT = Path(__file__).resolve().parent.parent
# BAGEL-7B-MoT as its llm_config.json / vit_config.json (after the reference's "num_hidden_layers
# -= 1") and the FLUX autoencoder's parameters state it; its tokenizer has 151665 tokens.
BAGEL_7B_MOT = ModelConfig(
    llm=LLMConfig(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                  num_key_value_heads=4, vocab_size=152064, rms_norm_eps=1e-6, rope_theta=1e6,
                  max_position_embeddings=32768),
    vit=ViTConfig(hidden_size=1152, intermediate_size=4304, num_hidden_layers=26, num_attention_heads=16,
                  patch_size=14, image_size=980),
    vae=VAEConfig(ch=128, ch_mult=(1, 2, 4, 4), num_res_blocks=2, z_channels=16),
)

# SHA-256 of make_tiny(seed=7)'s weight files as the whole-state-dict writer (safetensors' save_file)
# made them before writing was streamed: a seed keeps giving the same files, whatever the writer.
TINY_SEED_7_SHA256 = {
    "ema.safetensors": "a33556b40a907534f5cd4ffa8aca92eff37d369ad2e16cda2b132b3349c4ac6b",
    "ae.safetensors": "330fb186c4b43644eb6915f97890edce821941a8ea22f71f9c6798fa8b14801b",
}

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
    with pytest.raises(InputError, match=r"size: 'huge' is not one of \['full', 'small', 'tiny'\]"):
        make_tiny(tmp_path / "x", size="huge")
    with pytest.raises(InputError, match=r"seed: -1 must be an integer in 0..2\^63-1"):
        make_tiny(tmp_path / "x", seed=-1)
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


def test_tiny_files_are_byte_identical_to_the_whole_state_dict_writers(made):
    for name, digest in TINY_SEED_7_SHA256.items():
        assert hashlib.sha256((made / name).read_bytes()).hexdigest() == digest, name


def test_preset_config_is_what_the_written_json_files_read_back(made):
    n_tokens = len(Tokenizer.from_dir(made))
    assert ModelConfig.from_folder(made) == preset_config("tiny", n_tokens)


def test_full_preset_is_bagel_7b_mot_with_our_tokenizer(made):
    n_tokens = len(Tokenizer.from_dir(made))
    assert preset_config("full", n_tokens) == BAGEL_7B_MOT
    assert BAGEL_7B_MOT.vae == VAEConfig()  # the real folder ships no ae_config.json: the defaults
    assert SIZES["full"].file_dtype == torch.bfloat16


def test_full_preset_tensors_are_exactly_the_slots_of_the_real_model(made):
    weights = RandomWeights(preset_config("full", len(Tokenizer.from_dir(made))), Tokenizer.from_dir(made), seed=0,
                            device=torch.device("cpu"), dtype=torch.bfloat16, label="full")
    model, vae = build_empty(BAGEL_7B_MOT)
    for source, root, name_map in ((weights.ema, model, EMA_NAME_MAP), (weights.ae, vae, AE_NAME_MAP)):
        expected = {to_checkpoint_key(key, name_map): tuple(getattr(module, leaf).shape)
                    for key, module, leaf, _ in tensor_slots(root)}
        assert source.shapes() == expected  # same names, same shapes, nothing more (no data is made)
    ema = weights.ema.shapes()
    assert ema["language_model.model.embed_tokens.weight"] == (152064, 3584)
    assert ema["language_model.model.layers.27.mlp_moe_gen.down_proj.weight"] == (3584, 18944)
    assert ema["language_model.model.layers.0.self_attn.k_proj.weight"] == (512, 3584)  # 4 KV heads × 128
    assert ema["vit_model.vision_model.embeddings.patch_embedding.weight"] == (1152, 3 * 14 * 14)
    assert "vit_model.vision_model.encoder.layers.25.mlp.fc2.weight" in ema
    assert "vit_model.vision_model.encoder.layers.26.mlp.fc2.weight" not in ema  # the 27th is dropped


def test_full_preset_weighs_what_the_readme_states(made):
    weights = RandomWeights(BAGEL_7B_MOT, Tokenizer.from_dir(made), seed=0, device=torch.device("cpu"),
                            dtype=torch.bfloat16, label="full")
    files = data_bytes(weights.ema.shapes(), torch.bfloat16) + data_bytes(weights.ae.shapes(), torch.bfloat16)
    assert files == paper_weight_bytes(BAGEL_7B_MOT, dtype=torch.bfloat16)
    assert round(files / 2**30, 1) == 27.4  # README, "Memory per mode": none (bf16)
    header = safetensors_header(weights.ema.shapes(), torch.bfloat16, {"format": "pt"})
    parsed = json.loads(header[8:])
    assert int.from_bytes(header[:8], "little") == len(header) - 8 and len(header) % 8 == 0
    assert parsed["language_model.lm_head.weight"]["dtype"] == "BF16"
    assert max(e["data_offsets"][1] for k, e in parsed.items() if k != "__metadata__") \
        == data_bytes(weights.ema.shapes(), torch.bfloat16)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_streamed_writer_gives_exactly_save_files_bytes(made, tmp_path, dtype):
    config, tokenizer = ModelConfig.from_folder(made), Tokenizer.from_dir(made)

    def weights() -> RandomWeights:
        return RandomWeights(config, tokenizer, seed=11, device=torch.device("cpu"), dtype=dtype, label="tiny")

    write_safetensors(tmp_path / "streamed.safetensors", weights().ema, dtype=dtype, metadata={"format": "pt"})
    save_file(dict(weights().ema.tensors()), tmp_path / "whole.safetensors", metadata={"format": "pt"})
    streamed = (tmp_path / "streamed.safetensors").read_bytes()
    assert streamed == (tmp_path / "whole.safetensors").read_bytes()
    with safe_open(str(tmp_path / "streamed.safetensors"), framework="pt") as handle:
        for key, tensor in weights().ema.tensors():
            assert torch.equal(handle.get_tensor(key), tensor), key


def test_small_preset_streams_to_disk_with_little_memory_and_reads_back_identically(tmp_path):
    folder = tmp_path / "small"
    script = (  # a fresh process, warmed up on the tiny preset, so the peak is the small write's own
        "import json, resource, sys\n"
        "from bagel.tiny import make_tiny\n"
        "make_tiny(sys.argv[2], size='tiny')\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "make_tiny(sys.argv[1], seed=4, size='small')\n"
        "print(json.dumps([before, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss]))\n"
    )
    done = subprocess.run([sys.executable, "-c", script, str(folder), str(tmp_path / "warm")], cwd=ROOT,
                          capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr
    before_kib, peak_kib = json.loads(done.stdout.splitlines()[-1])
    file_bytes = sum((folder / name).stat().st_size for name in ("ema.safetensors", "ae.safetensors"))
    assert file_bytes > 250e6
    # A whole state dict would add at least the file size (the old writer: +400 MiB); measured +50 MiB.
    assert (peak_kib - before_kib) * 1024 < file_bytes / 3
    weights = RandomWeights(ModelConfig.from_folder(folder), Tokenizer.from_dir(folder), seed=4,
                            device=torch.device("cpu"), dtype=torch.float32, label="small")
    with safe_open(str(folder / "ema.safetensors"), framework="pt") as handle:
        assert {k: tuple(handle.get_slice(k).get_shape()) for k in handle.keys()} == weights.ema.shapes()
        key, first = next(weights.ema.tensors())  # the first draw (the writer test compares every byte)
        assert torch.equal(handle.get_tensor(key), first)


def test_cli_make_tiny_offers_every_preset():
    from bagel.cli import build_parser

    parser = build_parser()
    for size in SIZES:
        assert parser.parse_args(["make-tiny", "x", "--size", size]).size == size
