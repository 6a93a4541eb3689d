"""SigLIP NaViT, connector and position tables against the reference goldens (``vit_features``)."""

import pytest
import torch
from safetensors.torch import load_file

from bagel.config import BagelConstants, ViTConfig
from bagel.pos_embed import PositionTable, sincos_table
from bagel.transforms import (
    image_to_tensor,
    load_image,
    patchify_vit,
    resize_for_vae,
    resize_for_vit,
    to_rgb,
)
from bagel.vit import Connector, SiglipNaViT

ATOL = 1e-4
CONSTANTS = BagelConstants()
MAX_SIDE = CONSTANTS.vit_max_num_patch_per_side


def assert_close(name: str, got: torch.Tensor, expected: torch.Tensor, atol: float = ATOL):
    assert got.shape == expected.shape, f"{name}: {tuple(got.shape)} != {tuple(expected.shape)}"
    diff = (got.float() - expected.float()).abs()
    assert diff.max() <= atol, (f"{name}: max abs diff {diff.max():.3g}, mean {diff.mean():.3g} "
                                f"(atol {atol})")


def _section(state: dict, prefix: str) -> dict:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


@pytest.fixture(scope="module")
def ema(golden_dir):
    return load_file(golden_dir / "ema.safetensors")


@pytest.fixture(scope="module")
def golden(golden_dir):
    return load_file(golden_dir / "golden" / "tensors.safetensors")


@pytest.fixture(scope="module")
def vit_cfg(golden_dir):
    return ViTConfig.from_file(golden_dir / "vit_config.json")


@pytest.fixture(scope="module")
def modules(ema, vit_cfg):
    vit = SiglipNaViT(vit_cfg)
    vit.load_state_dict(_section(ema, "vit_model."), strict=True)
    llm_width = ema["connector.fc2.weight"].shape[0]
    connector = Connector(vit_cfg.hidden_size, llm_width, CONSTANTS.connector_act)
    connector.load_state_dict(_section(ema, "connector."), strict=True)
    table = PositionTable(MAX_SIDE, llm_width)
    table.load_state_dict(_section(ema, "vit_pos_embed."), strict=True)
    return vit.eval(), connector.eval(), table


def _vit_input(golden_dir, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    raw = load_image((golden_dir / "golden" / f"{name}.png").read_bytes())
    picture = resize_for_vit(resize_for_vae(to_rgb(raw), CONSTANTS), CONSTANTS)
    return patchify_vit(image_to_tensor(picture), 14, MAX_SIDE)


def _cu(*lengths: int) -> torch.Tensor:
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)


def test_state_dict_keys_are_the_checkpoint_keys_and_build_on_meta(ema, vit_cfg):
    with torch.device("meta"):
        vit = SiglipNaViT(vit_cfg)
        connector = Connector(32, 64)
        table = PositionTable(MAX_SIDE, 64)
    for module, prefix in ((vit, "vit_model."), (connector, "connector."),
                           (table, "vit_pos_embed.")):
        stored = _section(ema, prefix)
        ours = module.state_dict()
        assert set(ours) == set(stored), prefix
        assert all(ours[k].shape == stored[k].shape for k in stored), prefix
        assert all(t.device.type == "meta" for t in ours.values()), prefix
    assert vit.vision_model.embeddings.patch_embedding.weight.shape == (32, 588)


def test_sincos_tables_equal_the_checkpoint_tables(ema):
    assert torch.equal(sincos_table(MAX_SIDE, 64), ema["vit_pos_embed.pos_embed"])
    latent_table = ema["latent_pos_embed.pos_embed"]
    assert torch.equal(sincos_table(CONSTANTS.max_latent_size, 64), latent_table)
    assert torch.equal(PositionTable(CONSTANTS.max_latent_size, 64).pos_embed, latent_table)


def test_vit_features_match_the_reference(golden_dir, golden, modules):
    vit, connector, table = modules
    patches, position_ids = _vit_input(golden_dir, "img_a1")
    assert patches.shape == (1591, 588)
    assert torch.equal(position_ids, golden["vit_features.vit_position_ids"])
    with torch.inference_mode():
        features = vit(patches, position_ids, _cu(len(position_ids)))
        to_llm = connector(features) + table(position_ids)
    assert_close("vit_encoder_out_first256", features[:256],
                 golden["vit_features.vit_encoder_out_first256"])
    assert_close("vit_tokens_to_llm", to_llm, golden["vit_features.vit_tokens_to_llm"])


def test_two_packed_pictures_give_the_same_features_as_each_alone(golden_dir, modules):
    vit, _, _ = modules
    first, first_pos = _vit_input(golden_dir, "img_a1")
    second, second_pos = _vit_input(golden_dir, "img_a2")
    assert first.shape[0] != second.shape[0]
    with torch.inference_mode():
        alone_1 = vit(first, first_pos, _cu(len(first)))
        alone_2 = vit(second, second_pos, _cu(len(second)))
        packed = vit(torch.cat([first, second]), torch.cat([first_pos, second_pos]),
                     _cu(len(first), len(second)))
    assert_close("first picture packed vs alone", packed[: len(first)], alone_1, atol=1e-5)
    assert_close("second picture packed vs alone", packed[len(first):], alone_2, atol=1e-5)
    # and attention really is restricted: one sequence over both differs
    with torch.inference_mode():
        mixed = vit(torch.cat([first, second]), torch.cat([first_pos, second_pos]),
                    _cu(len(first) + len(second)))
    assert (mixed[: len(first)] - alone_1).abs().max() > 1e-3


def test_connector_uses_the_requested_activation():
    torch.manual_seed(0)
    tanh_gelu = Connector(4, 6)
    exact_gelu = Connector(4, 6, act="gelu")
    exact_gelu.load_state_dict(tanh_gelu.state_dict())
    x = torch.randn(5, 4) * 3
    expected = tanh_gelu.fc2(torch.nn.functional.gelu(tanh_gelu.fc1(x), approximate="tanh"))
    assert torch.equal(tanh_gelu(x), expected)
    assert not torch.equal(exact_gelu(x), expected)
