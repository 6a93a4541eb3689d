"""Sampler: schedule against the reference's recorded steps, Euler on a known field, CFG math."""

import json

import pytest
import torch

from bagel.sampler import (branches_needed, combine_cfg, euler_step, guided_velocity, make_schedule)


def _golden_steps(golden_dir, case_id):
    cases = json.loads((golden_dir / "golden" / "cases.json").read_text())["cases"]
    case = next(c for c in cases if c["id"] == case_id)
    return case["inputs"], case["expected"]["steps"]


@pytest.mark.parametrize("case_id", ["t2i", "edit"])
def test_schedule_and_cfg_steps_match_reference(golden_dir, case_id):
    inputs, steps = _golden_steps(golden_dir, case_id)
    sched = make_schedule(inputs["num_timesteps"], inputs["timestep_shift"], tuple(inputs["cfg_interval"]))
    assert sched.num_steps == len(steps)
    assert sched.t.tolist() == pytest.approx([s["t"] for s in steps], abs=1e-7)
    used = [s["cfg_text_scale_used"] != 1.0 for s in steps]
    assert list(sched.cfg_on) == used


def test_cfg_interval_boundary_compares_in_float32():
    # t = 0.4 exactly in float32 is 0.4000000059604645 > 0.4 as doubles, but not as float32.
    sched = make_schedule(6, 1.0, (0.4, 1.0))  # linspace(1, 0, 6): 1, .8, .6, .4, .2
    assert sched.cfg_on == (True, True, True, False, False)


def test_euler_recovers_data_on_a_straight_flow():
    torch.manual_seed(0)
    data, noise = torch.randn(12, 64), torch.randn(12, 64)
    sched = make_schedule(9, 3.0, (0.0, 1.0))
    x = noise.clone()
    for k in range(sched.num_steps):
        x = euler_step(x, noise - data, sched.dt[k])  # v points from data to noise, constant
    assert torch.allclose(x, data, atol=1e-5)


def _branches(seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(10, 64, generator=g) for _ in range(3)]


def test_text_channel_renorm_clamps_per_token_and_skips_image_renorm():
    c, t, i = _branches()
    v = combine_cfg(c, t, i, 4.0, 2.0, "text_channel", 0.0)
    v_text = t + 4.0 * (c - t)
    scale = (c.norm(dim=-1, keepdim=True) / (v_text.norm(dim=-1, keepdim=True) + 1e-8)).clamp(0.0, 1.0)
    expected = i + 2.0 * (v_text * scale - i)
    assert torch.allclose(v, expected, atol=1e-6)


@pytest.mark.parametrize("renorm", ["global", "channel"])
def test_global_and_channel_renorm_bound_the_norm_by_the_conditional_one(renorm):
    c, t, i = _branches()
    v = combine_cfg(c, t, i, 4.0, 1.5, renorm, 0.0)
    if renorm == "global":
        assert v.norm() <= c.norm() * (1 + 1e-6)
    else:
        assert bool((v.norm(dim=-1) <= c.norm(dim=-1) * (1 + 1e-6)).all())


def test_global_renorm_is_per_image_when_rows_of_several_images_are_packed():
    a, b = _branches(1), _branches(2)
    together = combine_cfg(*(torch.cat([x, y]) for x, y in zip(a, b)), 4.0, 1.0, "global", 0.0, sizes=[10, 10])
    separate = torch.cat([combine_cfg(*a, 4.0, 1.0, "global", 0.0), combine_cfg(*b, 4.0, 1.0, "global", 0.0)])
    assert torch.allclose(together, separate, atol=1e-6)


def test_renorm_min_keeps_at_least_that_fraction():
    c, t, _ = _branches()
    v = combine_cfg(c, t, None, 30.0, 1.0, "global", 1.0)  # min = max = 1: no rescale at all
    assert torch.allclose(v, t + 30.0 * (c - t))


def test_no_cfg_outside_the_interval_or_with_text_scale_one():
    c, t, i = _branches()
    assert guided_velocity(c, t, i, cfg_on=False, text_scale=4.0, img_scale=2.0, renorm_type="global",
                           renorm_min=0.0) is c
    assert guided_velocity(c, t, i, cfg_on=True, text_scale=1.0, img_scale=2.0, renorm_type="global",
                           renorm_min=0.0) is c
    assert branches_needed(True, 4.0, 1.0) == (True, False)
    assert branches_needed(True, 4.0, 2.0) == (True, True)
    assert branches_needed(False, 4.0, 2.0) == (False, False)


def test_unknown_renorm_type_is_rejected():
    c, t, i = _branches()
    with pytest.raises(ValueError, match="cfg_renorm_type: 'bogus'"):
        combine_cfg(c, t, i, 4.0, 1.0, "bogus", 0.0)
