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


def _tryon(job_id: str, product: bytes, seed: int, **extra) -> JobInput:
    resolved = params.resolve("tryon", {"num_timesteps": 2, "seed": seed, **extra}, False)
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


def test_a_job_asking_for_taylorseer_gets_it_and_its_neighbour_does_not(make_settings, service_model):
    holder = EngineHolder(make_settings(model_path=str(service_model), device="cpu"))
    product = _png((30, 30, 180))
    chunk = [_tryon("exact", product, 5, num_timesteps=9), _tryon("cached", product, 6, num_timesteps=9,
                                                                   taylorseer=True)]
    exact, cached = holder.run(chunk, progress=lambda *a: None, should_cancel=lambda i: False)
    assert exact.error_code is None and cached.error_code is None
    assert exact.stats["denoise_blocks_cached"] == 0
    # 8 steps, three CFG branches each: full at 0-4 and 7, predicted at 5 and 6
    assert (cached.stats["denoise_blocks_full"], cached.stats["denoise_blocks_cached"]) == (18, 6)


def _png_chunk_types(png: bytes) -> list[bytes]:
    types, pos = [], 8
    while pos < len(png):
        length = int.from_bytes(png[pos:pos + 4], "big")
        types.append(png[pos + 4:pos + 8])
        pos += 12 + length
    return types


def test_a_result_png_carries_no_metadata_from_its_input(make_settings, service_model):
    holder = EngineHolder(make_settings(model_path=str(service_model), device="cpu"))
    exif = Image.Exif()
    exif[0x0112] = 6
    exif[0x010E] = "a caption the product photo came with"  # ImageDescription
    buf = io.BytesIO()
    Image.new("RGB", (128, 64), (180, 30, 30)).save(buf, format="JPEG", exif=exif.tobytes())
    (out,) = holder.run([_tryon("meta", buf.getvalue(), 1)], progress=lambda *a: None,
                        should_cancel=lambda i: False)
    assert out.error_code is None
    assert set(_png_chunk_types(out.png)) == {b"IHDR", b"IDAT", b"IEND"}  # no eXIf, tEXt, iCCP
    result = Image.open(io.BytesIO(out.png))
    assert dict(result.getexif()) == {} and result.text == {}
