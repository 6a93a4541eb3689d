"""The GPU module: one try-on chunk is one engine call that encodes the product once."""

from __future__ import annotations

import io

from PIL import Image

from worker import params
from worker.gpu import EngineHolder, JobInput, picture_context_seed


def _png(color: tuple[int, int, int], px: int = 64) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (px, px), color).save(buf, format="PNG")
    return buf.getvalue()


def _tryon(job_id: str, product: bytes, seed: int) -> JobInput:
    resolved = params.resolve("tryon", {"num_timesteps": 2, "seed": seed}, False)
    return JobInput(job_id=job_id, task="tryon", prompt=f"the bag in scene {seed}", images=[product],
                    think=False, width=64, height=64, params=resolved)


def test_a_tryon_chunk_encodes_the_product_once_and_matches_each_job_alone(make_settings, service_model):
    holder = EngineHolder(make_settings(model_path=str(service_model), device="cpu"))
    product = _png((180, 30, 30))
    chunk = [_tryon(f"j{seed}", product, seed) for seed in (1, 2, 3)]
    together = holder.run(chunk, progress=lambda *a: None, should_cancel=lambda i: False)

    assert [o.error_code for o in together] == [None, None, None]
    assert {o.stats["run_context_encodes"] for o in together} == {1}  # product: one VAE + ViT pass
    alone = holder.run([chunk[1]], progress=lambda *a: None, should_cancel=lambda i: False)[0]
    a = Image.open(io.BytesIO(together[1].png))
    b = Image.open(io.BytesIO(alone.png))
    diff = max(abs(x - y) for p, q in zip(a.getdata(), b.getdata(), strict=True) for x, y in zip(p, q))
    assert diff <= 1
    assert together[0].png != together[1].png  # each scene has its own initial noise


def test_context_seed_is_a_function_of_the_picture_bytes():
    one, other = _png((1, 2, 3)), _png((3, 2, 1))
    assert picture_context_seed(one) == picture_context_seed(bytes(one))
    assert picture_context_seed(one) != picture_context_seed(other)
    assert 0 <= picture_context_seed(one) < 2**63
