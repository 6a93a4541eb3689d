"""Golden parity: every case of the bagel-tiny fixture through ``parity.verify_folder``.

One test per case, so a regression names the case; the engine is loaded once per session.
"""

import pytest

from bagel.engine import Engine
from bagel.parity import case_ids, verify_folder
from tests.fixtures.model import DATA

GOLDEN = DATA / "bagel-tiny"


@pytest.fixture(scope="module")
def fp32_engine(golden_dir):
    return Engine.load(golden_dir, device="cpu", dtype="float32")


@pytest.mark.parametrize("case_id", case_ids(GOLDEN))
def test_golden_case_matches_reference(fp32_engine, golden_dir, case_id):
    (report,) = verify_folder(golden_dir, only=[case_id], engine=fp32_engine)
    assert report.case_id == case_id
    assert report.ok, f"{case_id}: max abs diff {report.max_abs_diff:.3g}; {report.detail}"


def test_every_fixture_case_type_is_known(golden_dir, fp32_engine):
    reports = verify_folder(golden_dir, only=["tokenize"], engine=fp32_engine)
    assert [r.case_id for r in reports] == ["tokenize"]
    assert set(case_ids(golden_dir)) >= {"tokenize", "vae_roundtrip", "vit_features", "understand",
                                         "understand_think", "t2i", "t2i_think", "edit", "edit_global",
                                         "t2i_multi", "t2i_taylorseer", "edit_taylorseer", "t2i_think_taylorseer"}


def test_verifier_flags_a_tampered_golden(tmp_path, golden_dir, fp32_engine):
    """A golden folder whose expected text was altered must fail — the verifier can fail."""
    import json
    import shutil

    folder = tmp_path / "tampered"
    shutil.copytree(golden_dir, folder)
    cases_path = folder / "golden" / "cases.json"
    raw = json.loads(cases_path.read_text())
    for case in raw["cases"]:
        if case["id"] == "understand":
            case["expected"]["generated_ids"][3] += 1
    cases_path.write_text(json.dumps(raw))
    (report,) = verify_folder(folder, only=["understand"], engine=fp32_engine)
    assert not report.ok
    assert "generated_ids" in report.detail
