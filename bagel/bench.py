"""The throughput benchmark behind ``bagel bench``: the naive engine against the optimised one.

Owns: the benchmark checkpoint (built with ``make_tiny`` and cached, or taken from a folder),
the scenarios (``t2i1``, ``edit1``, ``tryon8``, ``think8``, ``mixed``) as lists of requests,
running each scenario through ``Engine(mode="naive")`` and ``Engine(mode="batched")`` in one
process (after one warm-up of both), what is measured around those runs, the JSON report and
its text table. Leaves inference to ``engine.py``, the FLOP model to ``flops.py`` and the hooks and
clocks to ``bench_instruments.py``.

What is measured, and how (nothing here changes what the engine computes):
  * wall seconds of each ``engine.run`` call (encodes, prefill, think decoding, denoising and
    VAE decoding included) → images/s and s/image;
  * LLM forwards, counted with forward hooks on the decoder and sorted by their packed layout:
    a forward with a segment that writes nothing to the cache is a denoising-loop forward (the
    query block of a denoising step), one whose segments are all single rows is a decode step,
    anything else a context prefill;
  * context encodes: input pictures through the VAE encoder and through SigLIP, counted with
    hooks on those modules; one context encode is one picture's pass through both (an edit) —
    the larger of the two counts;
  * the denoising loop: its analytic FLOPs (``flops.forward_flops`` of every loop forward) over
    its wall time, each loop span running from its first loop forward to the last step's
    progress callback (CUDA events on a GPU); next to it the GFLOP/s of ``torch.mm`` of
    ``[rows per loop forward, hidden] × [hidden, intermediate]`` in the engine dtype, measured
    in the same process;
  * peak memory during each run: resident set size sampled every 10 ms on the CPU,
    ``torch.cuda.max_memory_allocated`` on CUDA;
  * where the time goes, per image: picture encodes (VAE encoder + SigLIP), context prefills,
    think decoding, the denoising loop and the VAE decoder, each the summed wall time of those
    modules' forwards (the loop: its spans), and what is left (sampler arithmetic between
    forwards, packing, PNG-ready conversion); with the loop's analytic FLOPs per image in both
    modes, which shows how much of the ratio batching can reach when both modes do the same
    arithmetic.

Benchmark sizes: pictures are ``IMAGE_PX`` square (256 px for ``small``, as the throughput issue
fixes it). The reference's transforms upscale every input to at least 512 px for the VAE and
224 px for SigLIP; the benchmark lowers both minimum sides to the picture size, so an edit
works on (and returns) a 256×256 picture like a generation. Everything else is the task's
defaults (``max_think_tokens`` 1024 included: a think stream ends at its end-of-message token)
except ``num_timesteps`` (20); both are stated in the report.
"""

from __future__ import annotations

import gc
import logging
import os
import platform
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from bagel.config import GenerationParams
from bagel.engine import Engine
from bagel.errors import InputError
from bagel.bench_instruments import Instruments, PeakRss
from bagel.flops import measure_gemm_gflops
from bagel.loading import LoadedCheckpoint, load_checkpoint, resolve_device
from bagel.requests import Request, Result

logger = logging.getLogger(__name__)

TAYLORSEER_SCENARIOS = ("t2i1_taylorseer", "tryon8_taylorseer")
SCENARIOS = ("t2i1", "edit1", "tryon8", "think8", "mixed", *TAYLORSEER_SCENARIOS)
DEFAULT_SCENARIOS = ("t2i1", "edit1", "tryon8", "think8", "mixed")
PHASES = ("encode", "prefill", "think", "denoise", "vae_decode", "other")
IMAGE_PX = {"tiny": 64, "small": 256}
DEFAULT_STEPS = 20
# TaylorSeer pays only over a long schedule (five full warm-up steps, then one in three): its
# scenarios use the reference's default of 50 timesteps.
DEFAULT_TAYLORSEER_STEPS = 50
DEFAULT_THINK_TOKENS = GenerationParams().max_think_tokens  # the task default, as the issue asks
CHECKPOINT_SEED = 0

SCENES = (
    "Place the bag on a sunlit beach at golden hour.",
    "Show the bag on a marble cafe table in Paris.",
    "Put the bag on a wooden shelf in a cosy bookshop.",
    "The bag hangs from a hook in a minimalist white studio.",
    "Set the bag on wet city pavement at night with neon reflections.",
    "The bag rests on moss in a misty pine forest.",
    "Show the bag on a hotel bed with crisp linen sheets.",
    "Put the bag on the passenger seat of a vintage car.",
)
IDEAS = (
    "a lamp shaped like a jellyfish",
    "a teapot that is also a city",
    "a bicycle made of glass",
    "a chair designed by a snail",
    "a clock that grows like a tree",
    "a backpack for a whale",
    "a house built from books",
    "a kite painted like a storm",
)


@dataclass(frozen=True)
class BenchOptions:
    """One benchmark run. ``model`` None builds (once, cached in ``cache_dir``) a random
    checkpoint of preset ``size``; ``steps`` is ``num_timesteps`` of every request; ``warm_up``
    runs a 2-step t2i, edit and think request through both engines before measuring."""

    size: str = "small"
    model: Path | None = None
    device: str = "auto"
    scenarios: tuple[str, ...] = DEFAULT_SCENARIOS
    steps: int = DEFAULT_STEPS
    taylorseer_steps: int = DEFAULT_TAYLORSEER_STEPS
    think_tokens: int = DEFAULT_THINK_TOKENS
    repeats: int = 1
    cache_dir: Path | None = None
    warm_up: bool = True
    gemm_min_seconds: float = 0.5

    def __post_init__(self) -> None:
        if self.size not in IMAGE_PX:
            raise InputError(f"size: {self.size!r} is not one of {sorted(IMAGE_PX)}")
        unknown = [s for s in self.scenarios if s not in SCENARIOS]
        if unknown or not self.scenarios:
            raise InputError(f"scenarios: {unknown or '(none)'} given, choose from {SCENARIOS}")
        if not 2 <= self.steps <= 1000:
            raise InputError(f"steps: {self.steps} is outside the allowed range 2..1000")
        if not 2 <= self.taylorseer_steps <= 1000:
            raise InputError(f"taylorseer_steps: {self.taylorseer_steps} is outside the allowed range 2..1000")
        if not 1 <= self.think_tokens <= 16384:
            raise InputError(f"think_tokens: {self.think_tokens} is outside the allowed range 1..16384")
        if not 1 <= self.repeats <= 20:
            raise InputError(f"repeats: {self.repeats} is outside the allowed range 1..20")


# ---- checkpoint and inputs ------------------------------------------------------------------


def checkpoint_folder(options: BenchOptions) -> Path:
    """``options.model``, or the cached random checkpoint of ``options.size`` (built if absent)."""
    if options.model is not None:
        return Path(options.model)
    from bagel.tiny import make_tiny

    cache = options.cache_dir or Path(tempfile.gettempdir()) / "bagel-bench"
    folder = cache / f"{options.size}-seed{CHECKPOINT_SEED}"
    if not folder.is_dir():
        logger.info("building the %s benchmark checkpoint in %s", options.size, folder)
        make_tiny(folder, seed=CHECKPOINT_SEED, size=options.size)
    return folder


def bench_checkpoint(checkpoint: LoadedCheckpoint, image_px: int) -> LoadedCheckpoint:
    """The same weights with the transforms' minimum sides lowered to ``image_px`` (see the
    module docstring); a picture of ``image_px`` then keeps its size."""
    consts = checkpoint.config.constants
    consts = replace(consts, vae_min_px=min(consts.vae_min_px, image_px),
                     vit_min_px=min(consts.vit_min_px, image_px))
    return replace(checkpoint, config=replace(checkpoint.config, constants=consts))


def product_picture(px: int, seed: int) -> Image.Image:
    """A deterministic stand-in product photo: a shaded backdrop and a bag-like shape."""
    rng = np.random.default_rng(seed)
    ramp = np.linspace(0.0, 1.0, px, dtype=np.float32)
    base = rng.uniform(60, 200, size=3).astype(np.float32)
    pixels = base[None, None, :] * (0.6 + 0.4 * ramp[:, None, None]) * (0.8 + 0.2 * ramp[None, :, None])
    pixels += rng.normal(0, 6, size=(px, px, 3)).astype(np.float32)
    img = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(img)
    colour = tuple(int(c) for c in rng.integers(0, 255, size=3))
    draw.rounded_rectangle((px * 0.25, px * 0.4, px * 0.75, px * 0.85), radius=max(1, px // 16), fill=colour)
    draw.arc((px * 0.35, px * 0.2, px * 0.65, px * 0.55), 180, 360, fill=colour, width=max(1, px // 32))
    return img


def scenario_requests(name: str, *, image_px: int, steps: int, think_tokens: int,
                      latent_shape: tuple[int, int, int]) -> list[Request]:
    """The requests of scenario ``name`` (seeded: the same requests on every call).
    ``latent_shape`` is the VAE latent ``(z, H/8, W/8)`` of an ``image_px`` picture."""

    def params(task: str, seed: int) -> GenerationParams:
        return GenerationParams.for_task(task, num_timesteps=steps, max_think_tokens=think_tokens, seed=seed)

    def posterior(seed: int) -> torch.Tensor:
        # One posterior draw per product, shared by every scene of that product (see tryon8).
        return torch.randn((1, *latent_shape), generator=torch.Generator().manual_seed(seed))

    def generate(prompt: str, seed: int, think: bool = False) -> Request:
        return Request(task="generate", prompt=prompt, think=think, width=image_px, height=image_px,
                       params=params("generate", seed))

    def edit(picture: Image.Image, prompt: str, seed: int, noise: torch.Tensor | None = None) -> Request:
        return Request(task="edit", prompt=prompt, images=[picture], params=params("edit", seed),
                       posterior_noise=noise)

    if name in TAYLORSEER_SCENARIOS:  # the same requests, sampled with TaylorSeer
        return [replace(req, params=replace(req.params, taylorseer=True))
                for req in scenario_requests(name.removesuffix("_taylorseer"), image_px=image_px, steps=steps,
                                             think_tokens=think_tokens, latent_shape=latent_shape)]
    bag, shoe = product_picture(image_px, 1), product_picture(image_px, 2)
    if name == "t2i1":
        return [generate("A leather handbag on a marble table, soft studio light.", 11)]
    if name == "edit1":
        return [edit(bag, SCENES[0], 21)]
    if name == "tryon8":
        noise = posterior(31)
        return [edit(bag, scene, 300 + k, noise) for k, scene in enumerate(SCENES)]
    if name == "think8":
        return [generate(f"Design {idea}.", 400 + k, think=True) for k, idea in enumerate(IDEAS)]
    if name == "mixed":
        noise = posterior(51)
        return [
            generate("A leather handbag on a marble table, soft studio light.", 501),
            *(edit(bag, scene, 510 + k, noise) for k, scene in enumerate(SCENES[:3])),
            edit(shoe, SCENES[4], 520),
            generate(f"Design {IDEAS[0]}.", 530, think=True),
        ]
    raise InputError(f"scenario: {name!r} is not one of {SCENARIOS}")


# ---- measuring ------------------------------------------------------------------------------


@dataclass
class ModeFigures:
    """One scenario in one engine mode."""

    seconds: float
    images: int
    forwards: dict[str, int]
    loop_flops: int
    loop_rows: int
    loop_seconds: float
    loop_forward_seconds: float
    context_encodes: int
    vae_encodes: int
    vit_encodes: int
    peak_rss_bytes: int
    peak_cuda_bytes: int | None
    results: list[Result]
    phase_seconds: dict[str, float] = field(default_factory=dict)

    @property
    def total_forwards(self) -> int:
        return sum(self.forwards.values())

    @property
    def loop_gflops(self) -> float:
        return self.loop_flops / self.loop_seconds / 1e9 if self.loop_seconds > 0 else 0.0

    @property
    def peak_mem_bytes(self) -> int:
        return self.peak_cuda_bytes if self.peak_cuda_bytes is not None else self.peak_rss_bytes


def measure(engine: Engine, requests: list[Request], instruments: Instruments) -> ModeFigures:
    """Run ``requests`` once through ``engine`` and return what was measured."""
    device = engine.device
    cuda = device.type == "cuda"
    gc.collect()
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    tally = instruments.begin()
    with PeakRss() as rss:
        started = time.perf_counter()
        results = engine.run(requests, progress=instruments.on_progress)
        if cuda:
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - started
    clock = instruments.clock
    loop_seconds = sum(clock.seconds(a, b) for a, b in tally.loop_spans)
    forward_seconds = sum(clock.seconds(a, b) for a, b in tally.loop_forward_stamps)
    phases = dict.fromkeys(PHASES, 0.0)
    for phase, a, b in tally.phase_stamps:
        phases[phase] += clock.seconds(a, b)
    phases["denoise"] = loop_seconds
    phases["other"] = max(0.0, seconds - sum(phases.values()))
    return ModeFigures(
        seconds=seconds, images=sum(r.image is not None for r in results), forwards=dict(tally.forwards),
        loop_flops=tally.loop_flops, loop_rows=tally.loop_rows, loop_seconds=loop_seconds,
        loop_forward_seconds=forward_seconds, context_encodes=max(tally.vae_encodes, tally.vit_encodes),
        vae_encodes=tally.vae_encodes, vit_encodes=tally.vit_encodes, peak_rss_bytes=rss.peak,
        peak_cuda_bytes=torch.cuda.max_memory_allocated(device) if cuda else None, results=results,
        phase_seconds=phases)


def _best(runs: list[ModeFigures]) -> ModeFigures:
    return min(runs, key=lambda r: r.seconds)


def max_pixel_difference(a: list[Result], b: list[Result]) -> int | None:
    """Largest |Δ| over the uint8 pixels of corresponding output images (None: no images)."""
    diffs = [int(np.abs(np.asarray(x.image, dtype=np.int16) - np.asarray(y.image, dtype=np.int16)).max())
             for x, y in zip(a, b) if x.image is not None and y.image is not None]
    return max(diffs) if diffs else None


def _per(value: float, count: float) -> float:
    return value / count if count else 0.0


def scenario_result(name: str, naive: ModeFigures, optimised: ModeFigures, gemm_gflops: float) -> dict:
    """One row of the report (the keys the issue fixes, then the supporting figures)."""
    n = optimised.images
    naive_ips = _per(naive.images, naive.seconds)
    opt_ips = _per(optimised.images, optimised.seconds)
    rows = optimised.loop_rows / optimised.forwards["loop"] if optimised.forwards["loop"] else 0
    return {
        "scenario": name,
        "images": n,
        "naive_images_per_s": naive_ips,
        "optimised_images_per_s": opt_ips,
        "ratio": opt_ips / naive_ips if naive_ips else 0.0,
        "naive_forwards_per_image": _per(naive.total_forwards, naive.images),
        "optimised_forwards_per_image": _per(optimised.total_forwards, n),
        "context_encodes": optimised.context_encodes,
        "loop_gflops": optimised.loop_gflops,
        "peak_mem_bytes": optimised.peak_mem_bytes,
        "naive_seconds_per_image": _per(naive.seconds, naive.images),
        "optimised_seconds_per_image": _per(optimised.seconds, n),
        "naive_context_encodes": naive.context_encodes,
        "naive_forwards": dict(naive.forwards),
        "optimised_forwards": dict(optimised.forwards),
        "naive_loop_gflops": naive.loop_gflops,
        "loop_seconds": optimised.loop_seconds,
        "loop_forward_seconds": optimised.loop_forward_seconds,
        "loop_flops": optimised.loop_flops,
        "loop_rows_per_forward": rows,
        "gemm_gflops": gemm_gflops,
        "loop_efficiency": optimised.loop_gflops / gemm_gflops if gemm_gflops else 0.0,
        "naive_peak_mem_bytes": naive.peak_mem_bytes,
        "vae_encodes": {"naive": naive.vae_encodes, "optimised": optimised.vae_encodes},
        "vit_encodes": {"naive": naive.vit_encodes, "optimised": optimised.vit_encodes},
        "max_pixel_diff": max_pixel_difference(naive.results, optimised.results),
        "naive_loop_flops": naive.loop_flops,
        "loop_flops_vs_naive": optimised.loop_flops / naive.loop_flops if naive.loop_flops else 0.0,
        "blocks_per_image": {  # query blocks (one image's CFG branch at one step): computed / predicted
            mode: {kind: _per(sum(r.stats.get(f"denoise_blocks_{kind}", 0) for r in figures.results), figures.images)
                   for kind in ("full", "cached")}
            for mode, figures in (("naive", naive), ("optimised", optimised))},
        "phase_seconds_per_image": {
            "naive": {k: _per(v, naive.images) for k, v in naive.phase_seconds.items()},
            "optimised": {k: _per(v, n) for k, v in optimised.phase_seconds.items()},
        },
    }


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def _load_average() -> float | None:
    """The 1-minute load average (other processes skew CPU timings; the report says how much)."""
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else None


def run_bench(options: BenchOptions, *, on_scenario: Callable[[dict], None] | None = None) -> dict:
    """Run every scenario of ``options`` in both modes and return the report (JSON-ready).
    ``on_scenario`` is called with each finished row (for live output)."""
    device = resolve_device(options.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    folder = checkpoint_folder(options)
    image_px = IMAGE_PX[options.size]
    checkpoint = bench_checkpoint(load_checkpoint(folder, device=device, dtype=dtype), image_px)
    naive_engine = Engine(checkpoint, mode="naive")
    optimised_engine = Engine(checkpoint, mode="batched")
    cfg = checkpoint.config
    down = cfg.vae.downsample
    latent_shape = (cfg.vae.z_channels, image_px // down, image_px // down)

    def requests(name: str, steps: int, think_tokens: int) -> list[Request]:
        return scenario_requests(name, image_px=image_px, steps=steps, think_tokens=think_tokens,
                                 latent_shape=latent_shape)

    load_before = _load_average()
    instruments = Instruments(checkpoint)
    try:
        if options.warm_up:
            warm_up = [*requests("t2i1", 2, 2), *requests("edit1", 2, 2), requests("think8", 2, 2)[0]]
            for engine in (naive_engine, optimised_engine):
                measure(engine, warm_up, instruments)
            logger.info("warm-up done on %s", _device_name(device))
        rows, shape_gemm = [], {}
        for name in options.scenarios:
            # A TaylorSeer scenario runs against the same naive baseline as its exact one: the
            # reference's shape, without the step cache.
            taylor = name in TAYLORSEER_SCENARIOS
            steps = options.taylorseer_steps if taylor else options.steps
            reqs = requests(name, steps, options.think_tokens)
            baseline = requests(name.removesuffix("_taylorseer"), steps, options.think_tokens)
            naive_runs, opt_runs = [], []
            for k in range(options.repeats):  # alternate the order so neither mode always goes first
                order = ((naive_engine, naive_runs, baseline), (optimised_engine, opt_runs, reqs))
                for engine, runs, batch in order if k % 2 == 0 else order[::-1]:
                    runs.append(measure(engine, batch, instruments))
            naive, optimised = _best(naive_runs), _best(opt_runs)
            loop_rows = round(optimised.loop_rows / max(1, optimised.forwards["loop"]))
            if loop_rows not in shape_gemm:
                shape_gemm[loop_rows] = measure_gemm_gflops(
                    max(1, loop_rows), cfg.llm.hidden_size, cfg.llm.intermediate_size, device=device, dtype=dtype,
                    min_seconds=options.gemm_min_seconds)
            row = scenario_result(name, naive, optimised, shape_gemm[loop_rows])
            row["num_timesteps"] = steps
            rows.append(row)
            logger.info("%s: naive %.3f img/s, optimised %.3f img/s (%.2fx)", name,
                        row["naive_images_per_s"], row["optimised_images_per_s"], row["ratio"])
            if on_scenario is not None:
                on_scenario(row)
    finally:
        instruments.close()
    widest = max(rows, key=lambda r: (r["scenario"].startswith("tryon8"), r["loop_rows_per_forward"]))
    return {
        "device": _device_name(device),
        "size": options.size,
        "num_timesteps": options.steps,
        "taylorseer_steps": options.taylorseer_steps,
        "gemm_gflops": widest["gemm_gflops"],
        "gemm_shape": [round(widest["loop_rows_per_forward"]), cfg.llm.hidden_size, cfg.llm.intermediate_size],
        "dtype": str(dtype).removeprefix("torch."),
        "image_px": image_px,
        "max_think_tokens": options.think_tokens,
        "repeats": options.repeats,
        "warm_up": options.warm_up,
        "checkpoint": str(folder),
        "torch": torch.__version__,
        "cpu_count": os.cpu_count(),
        "load_average_1m": [load_before, _load_average()],
        "results": rows,
    }


# ---- the table ------------------------------------------------------------------------------

_COLUMNS = (
    ("scenario", "{}", "scenario"),
    ("img", "{}", "images"),
    ("naive img/s", "{:.3f}", "naive_images_per_s"),
    ("opt img/s", "{:.3f}", "optimised_images_per_s"),
    ("ratio", "{:.2f}x", "ratio"),
    ("naive s/img", "{:.2f}", "naive_seconds_per_image"),
    ("opt s/img", "{:.2f}", "optimised_seconds_per_image"),
    ("naive fwd/img", "{:.1f}", "naive_forwards_per_image"),
    ("opt fwd/img", "{:.1f}", "optimised_forwards_per_image"),
    ("ctx enc naive/opt", "{}", None),
    ("loop GFLOP/s", "{:.1f}", "loop_gflops"),
    ("GEMM GFLOP/s", "{:.1f}", "gemm_gflops"),
    ("loop/GEMM", "{:.0%}", "loop_efficiency"),
    ("peak MiB naive/opt", "{}", None),
    ("steps", "{}", "num_timesteps"),
    ("blocks full/cached", "{}", None),
    ("loop FLOPs vs naive", "{:.0%}", "loop_flops_vs_naive"),
    ("max px diff", "{}", "max_pixel_diff"),
)


def _cell(row: dict, fmt: str, key: str | None, title: str) -> str:
    if title.startswith("ctx enc"):
        return f"{row['naive_context_encodes']}/{row['context_encodes']}"
    if title.startswith("peak MiB"):
        return f"{row['naive_peak_mem_bytes'] / 2**20:.0f}/{row['peak_mem_bytes'] / 2**20:.0f}"
    if title.startswith("blocks"):
        blocks = row["blocks_per_image"]["optimised"]
        return f"{blocks['full']:.0f}/{blocks['cached']:.0f}"
    value = row[key]
    return "-" if value is None else fmt.format(value)


def _render(cells: list[list[str]]) -> list[str]:
    """Fixed-width lines: the first row a header underlined with dashes, the first column
    left-aligned, the others right-aligned."""
    widths = [max(len(r[c]) for r in cells) for c in range(len(cells[0]))]
    lines = []
    for k, r in enumerate(cells):
        lines.append("  ".join(v.rjust(w) if c else v.ljust(w) for c, (v, w) in enumerate(zip(r, widths))))
        if k == 0:
            lines.append("  ".join("-" * w for w in widths))
    return lines


def _phase_cells(rows: list[dict]) -> list[list[str]]:
    cells = [["scenario", *PHASES, "denoise GFLOP/img"]]
    for row in rows:
        split = row["phase_seconds_per_image"]
        n = max(1, row["images"])
        cells.append([row["scenario"],
                      *(f"{split['naive'][p]:.2f} -> {split['optimised'][p]:.2f}" for p in PHASES),
                      f"{row['naive_loop_flops'] / n / 1e9:.0f} / {row['loop_flops'] / n / 1e9:.0f}"])
    return cells


def format_table(report: dict) -> str:
    """The report as a fixed-width text table with a header stating the conditions."""
    head = (f"bagel bench: size {report['size']} on {report['device']}, {report['dtype']}, "
            f"{report['image_px']}x{report['image_px']} px pictures, task defaults except "
            f"num_timesteps={report['num_timesteps']} ({report['taylorseer_steps']} for *_taylorseer) and "
            f"max_think_tokens={report['max_think_tokens']}; "
            f"best of {report['repeats']} run(s) per mode")
    load = report.get("load_average_1m") or [None, None]
    if None not in load:
        head += f"; 1-min load average {load[0]:.1f} -> {load[1]:.1f} on {report['cpu_count']} CPUs"
    cells = [[title for title, _, _ in _COLUMNS]]
    cells += [[_cell(row, fmt, key, title) for title, fmt, key in _COLUMNS] for row in report["results"]]
    lines = [head, "", *_render(cells)]
    lines += ["", "Seconds per image by phase, naive -> optimised (denoise GFLOP/img: the loop's analytic FLOPs):", ""]
    lines += _render(_phase_cells(report["results"]))
    m, k, n = report["gemm_shape"]
    lines += ["", f"GEMM reference: torch.mm [{m}, {k}] x [{k}, {n}] at "
                  f"{report['gemm_gflops']:.1f} GFLOP/s (best of 3 rounds, same process); loop GFLOP/s = analytic "
                  "decoder FLOPs of the denoising forwards / wall time of the denoising loop.",
              "fwd/img: LLM forwards (prefill + think decode + denoising) per image; ctx enc: input pictures "
              "encoded (VAE + SigLIP); peak: RSS on CPU, max CUDA memory allocated on GPU.",
              "tryon8/mixed: the scenes of one product share its VAE posterior draw (one seed per scene).",
              "max px diff: naive vs optimised output pixels; both run the same float math in a different "
              "summation order, which random weights can amplify over the steps (CFG ×scale per step).",
              "*_taylorseer: the optimised engine samples with TaylorSeer (the reference's step cache: an "
              "approximation, off by default) against the exact naive baseline; blocks full/cached: query "
              "blocks (one image's CFG branch at one step) computed / predicted per image; loop FLOPs vs "
              "naive: the denoising FLOPs actually done, optimised over naive."]
    return "\n".join(lines)
