"""The ``bagel`` command line: run the engine on files, make tiny checkpoints, verify parity.

Owns: argument parsing, turning flags into ``Request``/``GenerationParams``, reading input
pictures and writing PNG/text outputs, the progress bar over denoising steps, logging set-up,
and the mapping of user errors to exit status 2 with a one-line message (no traceback).
Leaves everything else to the library: ``Engine`` (``engine.py``), ``make_tiny`` (``tiny.py``),
``make_adapter`` (``tiny_adapter.py``),
``verify_folder`` (``parity.py``), ``run_bench`` (``bench.py``).

    bagel make-tiny DIR [--seed N] [--size tiny|small|full] [--min-side-px N]
    bagel make-adapter --checkpoint DIR --out DIR [--rank 4 --alpha 8 --targets q_proj,k_proj --seed 0 --zero-b]
    bagel verify DIR [--device cpu] [--case ID ...]
    bagel bench [--size tiny|small] [--scenario NAME ...] [--json report.json]
    bagel generate --model DIR --prompt P [--width W --height H] [--think] --out out.png
    bagel edit --model DIR --image in.png --prompt P --out out.png
    bagel understand --model DIR --image in.png --prompt P [--think] [--max-new-tokens N]

Every ``GenerationParams`` knob has a flag; a flag left out keeps the task's default.
Exit status: 0 success, 1 a parity case failed (``verify``) or an unexpected engine error,
2 bad usage, bad input or a bad checkpoint.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from bagel.adapter_format import ATTENTION_TARGETS, SUPPORTED_TARGETS
from bagel.config import RENORM_TYPES, GenerationParams
from bagel.errors import BagelError, CheckpointError, InputError
from bagel.offload import OFFLOAD_MODES
from bagel.quant import QUANT_MODES

logger = logging.getLogger("bagel.cli")

# flag dest → GenerationParams field (flags left at None keep the task default)
PARAM_FLAGS = {
    "cfg_text_scale": "cfg_text_scale",
    "cfg_img_scale": "cfg_img_scale",
    "cfg_interval": "cfg_interval",
    "timestep_shift": "timestep_shift",
    "steps": "num_timesteps",
    "cfg_renorm_min": "cfg_renorm_min",
    "cfg_renorm_type": "cfg_renorm_type",
    "max_think_tokens": "max_think_tokens",
    "max_new_tokens": "max_new_tokens",
    "do_sample": "do_sample",
    "temperature": "text_temperature",
    "seed": "seed",
    "taylorseer": "taylorseer",
    "taylorseer_warmup": "taylorseer_warmup",
    "taylorseer_interval": "taylorseer_interval",
    "taylorseer_order": "taylorseer_order",
}


def _write(stream, text: str) -> None:
    stream.write(text if text.endswith("\n") else text + "\n")
    stream.flush()


def _add_engine_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, type=Path, help="checkpoint folder (real BAGEL layout)")
    p.add_argument("--prompt", required=True, help="text prompt / instruction / question")
    p.add_argument("--quantization", choices=QUANT_MODES, default="none",
                   help="quantize the LLM decoder linears while loading (bitsandbytes)")
    p.add_argument("--offload", choices=OFFLOAD_MODES, default="none",
                   help="layers: keep the decoder layers in host RAM and stream them to the GPU as they "
                        "run (slower; for 8-12 GB GPUs)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N (default: auto)")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="weight dtype (default: bfloat16 on CUDA, float32 on CPU)")
    p.add_argument("--think", action="store_true", help="generate reasoning text first")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    g = p.add_argument_group("generation parameters (default: the task's defaults)")
    g.add_argument("--cfg-text-scale", type=float)
    g.add_argument("--cfg-img-scale", type=float)
    g.add_argument("--cfg-interval", type=float, nargs=2, metavar=("START", "END"))
    g.add_argument("--timestep-shift", type=float)
    g.add_argument("--steps", type=int, help="number of timesteps (num_timesteps)")
    g.add_argument("--cfg-renorm-min", type=float)
    g.add_argument("--cfg-renorm-type", choices=RENORM_TYPES)
    g.add_argument("--max-think-tokens", type=int)
    g.add_argument("--max-new-tokens", type=int)
    g.add_argument("--do-sample", action="store_true", default=None, help="sample text instead of greedy")
    g.add_argument("--temperature", type=float, help="text sampling temperature")
    g.add_argument("--seed", type=int)
    g.add_argument("--taylorseer", action="store_true", default=None,
                   help="TaylorSeer step caching: predict most denoising steps from the computed ones "
                        "(faster, an approximation; the reference's enable_taylorseer)")
    g.add_argument("--taylorseer-warmup", type=int, help="full steps before caching (default 5)")
    g.add_argument("--taylorseer-interval", type=int, help="then one full step in N (default 3)")
    g.add_argument("--taylorseer-order", type=int, help="Taylor expansion order (default 6)")


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-v", "--verbose", action="store_true", help="log load facts and timings (INFO)")
    parser = argparse.ArgumentParser(prog="bagel", description="BAGEL-7B-MoT inference on files.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("make-tiny", parents=[common], help="write a random checkpoint in the real layout",
                       description="Write a random checkpoint in the real BAGEL-7B-MoT folder layout. "
                                   "The weights are streamed to disk one tensor at a time (little RAM).")
    p.add_argument("dir", type=Path)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", choices=("tiny", "small", "full"), default="tiny",
                   help="tiny: test-sized (~8 MB); small: benchmark-sized (~300 MB); full: BAGEL-7B-MoT's "
                        "real shapes in bf16 (~29 GB, for GPU time and memory measurements; "
                        "Engine.random('full') makes the same model on a GPU without the disk)")
    p.add_argument("--min-side-px", type=int, default=None,
                   help="lower the transforms' minimum picture side (fast CPU edits; real: 512)")

    p = sub.add_parser("make-adapter", parents=[common], help="write a random LoRA adapter (PEFT's format)",
                       description="Write a random LoRA adapter for a checkpoint with the peft library "
                                   "(adapter_config.json + adapter_model.safetensors, PEFT's own files). "
                                   "Only the checkpoint's JSON configs are read.")
    p.add_argument("--checkpoint", required=True, type=Path, help="checkpoint folder (real BAGEL layout)")
    p.add_argument("--out", required=True, type=Path, help="adapter folder to create")
    p.add_argument("--rank", type=int, default=4)
    p.add_argument("--alpha", type=float, default=8.0, help="lora_alpha (scale = alpha / rank)")
    p.add_argument("--targets", default=",".join(ATTENTION_TARGETS),
                   help="comma-separated targets: " + ", ".join(SUPPORTED_TARGETS) + ", or their last part "
                        "(gate_proj: both experts'); default: %(default)s")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--zero-b", action="store_true", help="B = 0: an adapter that changes nothing")

    p = sub.add_parser("verify", parents=[common], help="check a checkpoint against DIR/golden/cases.json")
    p.add_argument("dir", type=Path)
    p.add_argument("--device", default="cpu")
    p.add_argument("--case", action="append", dest="cases", metavar="ID",
                   help="run only this case (repeatable; default: every case)")

    p = sub.add_parser("bench", parents=[common], help="naive vs optimised engine throughput (bench.py)")
    p.add_argument("--size", choices=("tiny", "small"), default="small")
    p.add_argument("--model", type=Path, default=None, help="checkpoint folder (default: a cached random one)")
    p.add_argument("--device", default="auto")
    p.add_argument("--scenario", "--scenarios", action="extend", nargs="+", dest="scenarios", metavar="NAME",
                   help="run only these scenarios (default: t2i1 edit1 tryon8 think8 mixed; also "
                        "t2i1_taylorseer tryon8_taylorseer; repeatable)")
    p.add_argument("--steps", type=int, default=None, help="num_timesteps of every request (default 20)")
    p.add_argument("--taylorseer-steps", type=int, default=None,
                   help="num_timesteps of the *_taylorseer scenarios (default 50, the reference's)")
    p.add_argument("--think-tokens", type=int, default=None)
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--cache-dir", type=Path, default=None, help="where the random checkpoint is cached")
    p.add_argument("--no-warm-up", action="store_true")
    p.add_argument("--json", type=Path, default=None, help="also write the report here")

    p = sub.add_parser("generate", parents=[common], help="prompt → picture")
    _add_engine_flags(p)
    p.add_argument("--width", type=int, default=1024)
    p.add_argument("--height", type=int, default=1024)
    p.add_argument("--out", type=Path, default=Path("out.png"))

    p = sub.add_parser("edit", parents=[common], help="picture + instruction → picture")
    _add_engine_flags(p)
    p.add_argument("--image", required=True, type=Path)
    p.add_argument("--out", type=Path, default=Path("out.png"))

    p = sub.add_parser("understand", parents=[common], help="picture(s) + question → text on stdout")
    _add_engine_flags(p)
    p.add_argument("--image", required=True, type=Path, action="append",
                   help="input picture (repeat for several)")
    return parser


def _params(args: argparse.Namespace, task: str) -> GenerationParams:
    overrides = {field: getattr(args, flag) for flag, field in PARAM_FLAGS.items()
                 if getattr(args, flag) is not None}
    return GenerationParams.for_task(task, **overrides)


def _read_image(path: Path, field: str):
    from bagel.transforms import load_image

    try:
        data = path.read_bytes()
    except OSError as exc:
        raise InputError(f"{field}: cannot read {path} ({exc.strerror})") from exc
    return load_image(data, field=f"{field} ({path})")


class _ProgressBar:
    """A tqdm bar over denoising steps, created on the first progress callback."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.bar = None

    def __call__(self, index: int, step: int, total: int) -> None:
        if not self.enabled:
            return
        if self.bar is None:
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc="denoising", unit="step", file=sys.stderr, leave=False)
        self.bar.update(step - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _run_engine(args: argparse.Namespace, task: str) -> int:
    from bagel.engine import Engine
    from bagel.requests import Request

    params = _params(args, task)
    images = []
    if task == "edit":
        images = [_read_image(args.image, "image")]
    elif task == "understand":
        images = [_read_image(p, f"image[{i}]") for i, p in enumerate(args.image)]
    kwargs = {"width": args.width, "height": args.height} if task == "generate" else {}
    request = Request(task=task, prompt=args.prompt, images=images, think=args.think, params=params, **kwargs)
    started = time.perf_counter()
    engine = Engine.load(args.model, quantization=args.quantization, device=args.device, dtype=args.dtype,
                         offload=args.offload)
    loaded = time.perf_counter()
    bar = _ProgressBar(enabled=not args.no_progress and task != "understand")
    try:
        [result] = engine.run([request], progress=bar)
    finally:
        bar.close()
    done = time.perf_counter()
    if result.think_text:
        _write(sys.stderr, f"think: {result.think_text}")
    if task == "understand":
        _write(sys.stdout, result.text or "")
    else:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        result.image.save(args.out, format="PNG")
        _write(sys.stderr, f"wrote {args.out} ({result.image.width}x{result.image.height})")
    logger.info("load %.2f s, %s %.2f s", loaded - started, task, done - loaded)
    return 0


def _make_tiny(args: argparse.Namespace) -> int:
    from bagel.tiny import make_tiny

    started = time.perf_counter()
    folder = make_tiny(args.dir, seed=args.seed, size=args.size, min_side_px=args.min_side_px)
    _write(sys.stdout, f"wrote a {args.size} random checkpoint (seed {args.seed}) to {folder} "
                       f"in {time.perf_counter() - started:.1f} s")
    return 0


def _make_adapter(args: argparse.Namespace) -> int:
    from bagel.tiny_adapter import make_adapter

    targets = [name.strip() for name in args.targets.split(",") if name.strip()]
    folder = make_adapter(args.checkpoint, args.out, rank=args.rank, alpha=args.alpha, targets=targets,
                          seed=args.seed, zero_b=args.zero_b)
    _write(sys.stdout, f"wrote a rank-{args.rank} LoRA adapter (seed {args.seed}{', B = 0' if args.zero_b else ''}) "
                       f"to {folder}")
    return 0


def _verify(args: argparse.Namespace) -> int:
    from bagel.parity import verify_folder

    reports = verify_folder(args.dir, device=args.device, only=args.cases)
    unknown = sorted(set(args.cases or ()) - {r.case_id for r in reports})
    if unknown:
        raise InputError(f"--case: {', '.join(unknown)} not found in {args.dir / 'golden' / 'cases.json'}")
    width = max((len(r.case_id) for r in reports), default=4)
    for r in reports:
        status = "ok" if r.ok else "FAIL"
        detail = f"  {r.detail}" if r.detail else ""
        _write(sys.stdout, f"{r.case_id:<{width}}  max_abs_diff={r.max_abs_diff:.3g}  {status}{detail}")
    failed = [r.case_id for r in reports if not r.ok]
    _write(sys.stdout, f"{len(reports) - len(failed)}/{len(reports)} cases ok"
                       + (f"; failed: {', '.join(failed)}" if failed else ""))
    return 1 if failed or not reports else 0


def _bench(args: argparse.Namespace) -> int:
    import json

    from bagel.bench import BenchOptions, format_table, run_bench

    given = {"size": args.size, "model": args.model, "device": args.device, "steps": args.steps,
             "taylorseer_steps": args.taylorseer_steps,
             "think_tokens": args.think_tokens, "repeats": args.repeats, "cache_dir": args.cache_dir,
             "scenarios": tuple(args.scenarios) if args.scenarios else None,
             "warm_up": False if args.no_warm_up else None}
    options = BenchOptions(**{k: v for k, v in given.items() if v is not None})
    report = run_bench(options, on_scenario=lambda row: logger.info("bench %s done", row.get("scenario")))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    _write(sys.stdout, format_table(report))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        if args.command == "make-tiny":
            return _make_tiny(args)
        if args.command == "make-adapter":
            return _make_adapter(args)
        if args.command == "verify":
            return _verify(args)
        if args.command == "bench":
            return _bench(args)
        return _run_engine(args, args.command)
    except (InputError, CheckpointError) as exc:
        _write(sys.stderr, f"bagel: error [{exc.code}]: {exc}")
        return 2
    except BagelError as exc:
        _write(sys.stderr, f"bagel: error [{exc.code}]: {exc}")
        return 1


if __name__ == "__main__":
    sys.exit(main())
