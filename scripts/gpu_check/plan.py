"""What each ``--size`` runs, and what a run should cost before it starts.

Owns: the per-size scale of every check (``Scale``: picture sides, step and token counts, the
attention shapes) and the cost model the deadline logic uses (``Costs``): a run's work
(``Work``: decoder FLOPs, forwards, decoded megapixels, decode tokens) priced with nominal
rates, recalibrated from the runs already measured. Leaves the checks to the other modules.

The work of an image request follows the engine's own accounting: every denoising step runs
the CFG branches ``loops.branch_names`` picks for it (TaylorSeer: only the full evaluations of
``taylorseer.branch_schedule``), each a query block of ``(side/16)² + 2`` rows over its branch
context; a row costs ``flops.linear_flops_per_row`` and its attention ``flops.attention_flops``.
Context prefills are one row each (a shared product picture once per batch, per request in
naive mode). Contexts are estimated, not tokenized (prompt tokens ≈ characters / 3): the plan
only has to be right within tens of percent.

Nominal CUDA rates (an H100/H200-class card in bf16): 400 TFLOP/s effective for the large
GEMMs of a denoising step (~7 B parameters per row, 2 FLOPs per MAC), 10 ms of launch overhead
per decoder forward, 25 ms per decode token (reading ~15 GB of weights at ~4 TB/s is 4 ms; the
rest is the eager forward's launches), 0.3 s per decoded megapixel (VAE decoder, encoder,
picture conversion). After each measured batched run the FLOP rate of its quantization mode is
replaced by the measured one (clamped to 0.1–1.5× nominal); a think run does the same for the
per-token time. Offloaded layers cross PCIe at a nominal 20 GB/s (pinned copies; a PCIe 4.0 x16
link gives ~25, 5.0 ~50). The CPU rates are rough (a dry run is far inside any deadline).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from bagel.config import GenerationParams, LLMConfig
from bagel.flops import attended_pairs, attention_flops, linear_flops_per_row
from bagel.loops import branch_names
from bagel.requests import Request
from bagel.sampler import make_schedule
from bagel.taylorseer import TaylorSettings, branch_schedule

SIZES = ("full", "small", "tiny")


@dataclass(frozen=True)
class Scale:
    """One ``--size``: ``big_px`` the timings, try-on chunk and memory check (1024 on the real
    shapes), ``mid_px`` the output and batched-vs-naive checks, ``small_px`` the sync and OOM
    checks and the think picture; step and token counts; the attention check's query block rows,
    context lengths and forks per context; the CPU reference kernel's page size; ``min_side_px``
    lowers the transforms' minimum picture sides (None: the reference's 512/224 px)."""

    size: str
    big_px: int
    mid_px: int
    small_px: int
    steps: int
    tryon_steps: int
    memory_steps: int
    output_steps: int
    think_tokens: int
    answer_tokens: int
    attn_query_rows: int
    attn_contexts: tuple[int, ...]
    attn_forks: tuple[int, ...]
    cpu_page_size: int
    min_side_px: int | None


SCALES = {
    "full": Scale("full", big_px=1024, mid_px=512, small_px=256, steps=50, tryon_steps=10, memory_steps=4,
                  output_steps=20, think_tokens=1024, answer_tokens=32, attn_query_rows=4098,
                  attn_contexts=(9000, 6600, 4100), attn_forks=(3, 2, 2), cpu_page_size=256, min_side_px=None),
    "small": Scale("small", big_px=256, mid_px=128, small_px=64, steps=10, tryon_steps=4, memory_steps=3,
                   output_steps=4, think_tokens=64, answer_tokens=16, attn_query_rows=258,
                   attn_contexts=(600, 420, 270), attn_forks=(3, 2, 2), cpu_page_size=64, min_side_px=64),
    "tiny": Scale("tiny", big_px=32, mid_px=32, small_px=32, steps=4, tryon_steps=3, memory_steps=2,
                  output_steps=3, think_tokens=16, answer_tokens=8, attn_query_rows=18,
                  attn_contexts=(40, 29, 21), attn_forks=(3, 2, 2), cpu_page_size=16, min_side_px=32),
}


@dataclass
class Work:
    """What one engine call does, in the units the rates price."""

    flops: float = 0.0
    forwards: int = 0
    megapixels: float = 0.0
    tokens: int = 0

    def __add__(self, other: Work) -> Work:
        return Work(self.flops + other.flops, self.forwards + other.forwards,
                    self.megapixels + other.megapixels, self.tokens + other.tokens)

    def times(self, n: int) -> Work:
        return Work(self.flops * n, self.forwards * n, self.megapixels * n, self.tokens * n)


def prompt_tokens(prompt: str) -> int:
    return len(prompt) // 3 + 4


def image_work(llm: LLMConfig, params: GenerationParams, *, out_px: int, prompt: int,
               picture_px: int | None = None, think_tokens: int = 0, count: int = 1,
               naive: bool = False) -> Work:
    """``count`` image requests alike (an edit when ``picture_px`` is given, all sharing that
    picture); ``prompt`` tokens each."""
    lin = linear_flops_per_row(llm)
    q = (out_px // 16) ** 2 + 2
    if picture_px is None:
        picture = 0
        contexts = {"cond": prompt + think_tokens, "text": think_tokens, "img": prompt}
        has_img = think_tokens > 0
    else:
        vit = (min(picture_px, 980) // 14) ** 2 + 2
        picture = (picture_px // 16) ** 2 + 2 + vit
        contexts = {"cond": picture + prompt, "text": picture, "img": prompt}
        has_img = True
    schedule = make_schedule(params.num_timesteps, params.timestep_shift, params.cfg_interval)
    steps = [branch_names(params, on, has_img) for on in schedule.cfg_on]
    full_per_step = [0] * len(steps)
    loop = 0.0
    for branch, keys in contexts.items():
        evaluated = [branch in names for names in steps]
        if params.taylorseer:
            settings = TaylorSettings(params.taylorseer_warmup, params.taylorseer_interval, params.taylorseer_order)
            full = [x is True for x in branch_schedule(evaluated, settings)]
        else:
            full = evaluated
        full_per_step = [n + f for n, f in zip(full_per_step, full)]
        loop += sum(full) * (q * lin + attention_flops(llm, attended_pairs(q, keys, False)))
    prefill_rows = picture * (count if naive else 1) + count * 2 * (prompt + think_tokens)
    if naive:
        forwards = count * sum(full_per_step)
    else:  # one forward per step, split past the engine's 65,536 rows per forward
        forwards = sum(-(-count * n * q // (1 << 16)) for n in full_per_step)
    encodes = count if naive else 1
    return Work(flops=count * loop + prefill_rows * lin, forwards=forwards + 2,
                megapixels=(count * out_px ** 2 + encodes * (picture_px or 0) ** 2) / 1e6,
                tokens=think_tokens * (count if naive else 1))


def requests_work(llm: LLMConfig, requests: list[Request], naive: bool = False) -> Work:
    """The work of one engine call over ``requests``: the image requests priced as ``count``
    copies of the first one (a chunk is alike), an understanding request as its answer."""
    images = [r for r in requests if r.task != "understand"]
    answers = [r for r in requests if r.task == "understand"]
    work = Work(tokens=max((r.params.max_new_tokens for r in answers), default=0))
    if images:
        r = images[0]
        picture_px = r.images[0].size[0] if r.task == "edit" else None
        work = work + image_work(llm, r.params, out_px=picture_px or r.width, prompt=prompt_tokens(r.prompt),
                                 picture_px=picture_px, think_tokens=r.params.max_think_tokens if r.think else 0,
                                 count=len(images), naive=naive)
    return work


@dataclass(frozen=True)
class Rates:
    """Nominal prices of one device kind (see the module docstring)."""

    flops_per_s: float
    forward_s: float
    token_s: float
    megapixel_s: float
    load_s: float  # a load's fixed part
    load_bytes_per_s: float
    fixed_s: float  # per engine call
    h2d_bytes_per_s: float  # pinned host → device copies (offloaded layers; PCIe)


NOMINAL = {
    "cuda": Rates(flops_per_s=400e12, forward_s=0.010, token_s=0.025, megapixel_s=0.3, load_s=8.0,
                  load_bytes_per_s=1.5e9, fixed_s=0.3, h2d_bytes_per_s=20e9),
    "cpu": Rates(flops_per_s=3e10, forward_s=0.004, token_s=0.006, megapixel_s=2.0, load_s=1.5,
                 load_bytes_per_s=2e8, fixed_s=0.05, h2d_bytes_per_s=5e9),
}
QUANTIZED_LOAD_FACTOR = 1.5  # quantizing every decoder linear on arrival
QUANTIZED_FLOP_FACTOR = 0.6  # nf4/int8 GEMMs dequantize or rescale around the matmul


@dataclass
class Costs:
    """Planned seconds of runs on one device kind, recalibrated as runs are measured."""

    device_kind: str
    flops_per_s: dict[str, float] = field(default_factory=dict)
    token_s: dict[str, float] = field(default_factory=dict)

    @property
    def nominal(self) -> Rates:
        return NOMINAL[self.device_kind]

    def _rate(self, quantization: str) -> float:
        default = self.nominal.flops_per_s * (1.0 if quantization == "none" else QUANTIZED_FLOP_FACTOR)
        return self.flops_per_s.get(quantization, default)

    def _token(self, quantization: str) -> float:
        return self.token_s.get(quantization, self.nominal.token_s)

    def seconds(self, work: Work, quantization: str = "none") -> float:
        n = self.nominal
        return (work.flops / self._rate(quantization) + work.forwards * n.forward_s
                + work.tokens * self._token(quantization) + work.megapixels * n.megapixel_s + n.fixed_s)

    def load_seconds(self, weight_bytes: int, quantization: str) -> float:
        n = self.nominal
        seconds = n.load_s + weight_bytes / n.load_bytes_per_s
        return seconds * (QUANTIZED_LOAD_FACTOR if quantization != "none" else 1.0)

    def observe_run(self, work: Work, seconds: float, quantization: str) -> None:
        """Recalibrate the FLOP rate from a measured batched run of ``work``."""
        n = self.nominal
        other = work.forwards * n.forward_s + work.megapixels * n.megapixel_s + n.fixed_s
        compute = max(seconds - other, 0.2 * seconds)
        if work.flops > 0 and compute > 0:
            measured = work.flops / compute
            self.flops_per_s[quantization] = min(max(measured, 0.1 * n.flops_per_s), 1.5 * n.flops_per_s)

    def observe_tokens(self, tokens: int, seconds: float, quantization: str) -> None:
        """Recalibrate the per-token time from a measured decode of ``tokens`` tokens."""
        if tokens >= 8:
            n = self.nominal
            self.token_s[quantization] = min(max(seconds / tokens, 0.2 * n.token_s), 5 * n.token_s)
