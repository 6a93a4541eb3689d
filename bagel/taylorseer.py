"""TaylorSeer step caching (arXiv 2503.06923), as the reference's ``enable_taylorseer`` does it.

Owns: deciding, for one CFG branch of one image, which of its evaluations are computed in full
and which are predicted (``branch_schedule``, pure host arithmetic, so the denoising loop knows
every step's work before its first step), and the per-branch state that predicts a skipped
evaluation from the full ones (``TaylorState``). Leaves the loop to ``loops.py``.

The reference's behaviour (described in the golden fixture's README, "TaylorSeer cases"):
  * each CFG branch (conditional, text-free, image-free) counts its own evaluations ``n``; a
    branch skipped at a step (``cfg_interval``, a scale ≤ 1) is not evaluated and its counter
    does not move, so a branch that starts late gets its own warm-up;
  * an evaluation is full while ``n < warmup`` (5), then one in ``interval`` (3): full when the
    number of predicted evaluations since the last full one reaches ``interval − 1``;
  * a full evaluation stores the decoder's output ``y`` as ``D_0`` and, from ``n ≥ warmup − 1``
    on, the finite differences ``D_(i+1) = (D_i[new] − D_i[old]) / d`` up to ``order`` (6),
    ``d`` being ``n`` minus the previous full evaluation's ``n`` (differences are divided by
    the distance, not by a factorial); at ``n = 0`` the old factors are dropped;
  * a predicted evaluation runs no decoder layer: the output is ``Σ D_i · x^i / i!`` with ``x``
    the distance in evaluations to the last full one; norm, ``llm2vae``, CFG, renorm and the
    Euler step run as usual.
Departures from the reference: the reference keeps factors for every decoder layer, but a
predicted evaluation ignores each layer's input, so only the last layer's prediction reaches
the velocity — this keeps only the last layer's (the same result, ``layers``× less memory),
and only for the latent rows the velocity reads; the factors are float32 whatever the model's
dtype (finite differences of bfloat16 values lose most of their digits); the state lives in
one ``Engine.run`` (the reference leaks it into the next call).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class TaylorSettings:
    """The knobs of one request (``GenerationParams.taylorseer_*``)."""

    warmup: int = 5
    interval: int = 3
    order: int = 6


def branch_schedule(evaluated: Sequence[bool], settings: TaylorSettings) -> list[bool | None]:
    """Per step: None (branch not evaluated), True (full) or False (predicted), from whether the
    branch is evaluated at each step."""
    out: list[bool | None] = []
    n = since_full = 0
    for is_evaluated in evaluated:
        if not is_evaluated:
            out.append(None)
            continue
        full = n < settings.warmup or since_full == settings.interval - 1
        since_full = 0 if full else since_full + 1
        out.append(full)
        n += 1
    return out


def factor_count_after(full_evaluations: Sequence[int], settings: TaylorSettings) -> list[int]:
    """Factors stored after each full evaluation (their counters ``n``): one below
    ``warmup − 1``, then one more per full evaluation, at most ``order + 1``."""
    counts, previous = [], 0
    for n in full_evaluations:
        counts.append(1 if n < settings.warmup - 1 else min(previous + 1, settings.order + 1))
        previous = counts[-1]
    return counts


@dataclass
class TaylorState:
    """One branch of one image: its counter, the counter of its last full evaluation and the
    Taylor factors of the last decoder layer's output for its latent rows (float32)."""

    settings: TaylorSettings
    n: int = 0
    last_full: int = 0
    factors: list[torch.Tensor] = field(default_factory=list)

    def record_full(self, y: torch.Tensor) -> None:
        """A full evaluation produced ``y`` ``[rows, C]``: update the factors, advance ``n``."""
        y = y.float()
        if self.n == 0:
            self.factors = []
        new = [y]
        if self.n >= self.settings.warmup - 1:
            distance = self.n - self.last_full
            for i, old in enumerate(self.factors[:self.settings.order]):
                new.append((new[i] - old) / distance)
        self.factors = new
        self.last_full = self.n
        self.n += 1

    def predict(self) -> torch.Tensor:
        """The predicted output ``[rows, C]`` (float32) of this evaluation; advances ``n``."""
        x = self.n - self.last_full
        out = self.factors[0].clone()
        for i, factor in enumerate(self.factors[1:], start=1):
            out.add_(factor, alpha=x ** i / math.factorial(i))
        self.n += 1
        return out


def factor_bytes(rows: int, hidden: int, settings: TaylorSettings) -> int:
    """Memory of one branch's factors at their most: ``order + 1`` float32 ``[rows, C]``."""
    return (settings.order + 1) * rows * hidden * 4
