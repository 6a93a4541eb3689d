"""The two loops of inference: text decoding and latent denoising, for many requests at once.

Owns: ``decode_texts`` — lockstep decoding of several sequences (greedy or sampled with each
request's generator, stopping at ``<|im_end|>`` or the token limit), one packed LLM forward per
step for all of them; and ``denoise`` — the flow-matching loop of several images that share a
schedule, one packed forward per step over every image's query block and every CFG branch it
needs at that step. Both check cancellation between steps. Leaves contexts to ``contexts.py``,
the schedule and CFG math to ``sampler.py`` and the orchestration to ``engine.py``.

Conventions (the reference's ``generate_text`` / ``generate_image``): decoding feeds
``<|im_start|>`` first at the context's position; a sequence stops when the predicted token is
``<|im_end|>`` (not kept) or after its forward limit, the last prediction then being dropped.
The denoising query block is ``<|vision_start|>`` + latents + ``<|vision_end|>`` at the branch
context's own position, bidirectional, not cached.

Departures from the reference: several requests per forward (the reference decodes and
denoises one request at a time, and its ``global`` renorm spans the whole batch); the decode
writes into slots reserved up front instead of re-concatenating the cache every step;
``naive=True`` keeps one forward per request and CFG branch.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from bagel.config import GenerationParams
from bagel.contexts import Counters
from bagel.kv_cache import CacheSeq, KVCache
from bagel.model import BagelModel
from bagel.packing import Block, PackBuilder, PackedBatch
from bagel.requests import CancelFn, ProgressFn
from bagel.sampler import Schedule, branches_needed, euler_step, guided_velocity
from bagel.taylorseer import TaylorSettings, TaylorState, branch_schedule
from bagel.tokenizer import BOS_TOKEN, EOS_TOKEN, Tokenizer

BRANCH_ORDER = {"cond": 0, "text": 1, "img": 2}


@dataclass
class TextJob:
    """One sequence to decode from ``context`` (not modified: the decode writes its own slots)."""

    index: int
    context: CacheSeq
    max_new_tokens: int
    do_sample: bool
    temperature: float
    generator: torch.Generator
    record_logits: bool = False
    fed: list[int] = field(default_factory=list)
    logits: list[torch.Tensor] = field(default_factory=list)
    stop_reason: str = ""
    canceled: bool = False

    @property
    def generated_ids(self) -> list[int]:
        return self.fed[1:]


def reply_text(tokenizer: Tokenizer, fed: list[int]) -> str:
    """The reference's string: decode the fed ids, keep what lies before the first
    ``<|im_end|>``, then what lies between the first and second ``<|im_start|>``."""
    text = tokenizer.decode(fed).split(EOS_TOKEN)[0]
    parts = text.split(BOS_TOKEN)
    return parts[1] if len(parts) > 1 else parts[0]


def decode_texts(model: BagelModel, tokenizer: Tokenizer, cache: KVCache, jobs: list[TextJob],
                 counters: Counters, *, should_cancel: CancelFn | None = None,
                 on_step: ProgressFn | None = None, naive: bool = False) -> None:
    """Decode every job in lockstep; fills ``fed``, ``stop_reason`` and ``logits``."""
    lm = model.language_model
    limits = {id(j): j.max_new_tokens + 1 for j in jobs}  # forwards: the last prediction is dropped
    reserved = {id(j): cache.reserve(j.context, limits[id(j)]) for j in jobs}
    slots = {id(j): r.start for j, r in zip(jobs, reserved.values())}
    contexts = {id(j): r.base for j, r in zip(jobs, reserved.values())}
    current = {id(j): tokenizer.bos_id for j in jobs}
    active = list(jobs)
    step = 0
    while active:
        if should_cancel is not None:
            for j in active:
                if should_cancel(j.index):
                    j.canceled, j.stop_reason = True, "canceled"
            active = [j for j in active if not j.canceled]
        groups = [[j] for j in active] if naive else [active] if active else []
        for group in groups:
            builder = PackBuilder(cache)
            for j in group:
                if step == 0:
                    builder.add_copy(reserved[id(j)].copy)  # a paged cache moves the context's last page
                j.fed.append(current[id(j)])
                contexts[id(j)] = builder.add_text([current[id(j)]], contexts[id(j)], slot=slots[id(j)] + step)
            batch = builder.build(model.device)
            hidden = lm(lm.embed(batch.text_ids), batch, cache)
            logits = lm.lm_head(hidden).float()
            counters.forward({j.index for j in group})
            if all(not j.do_sample for j in group):
                picked = torch.argmax(logits, dim=-1)
            else:
                picked = torch.empty(len(group), dtype=torch.long, device=logits.device)
                for r, j in enumerate(group):
                    if j.do_sample:
                        probs = torch.softmax(logits[r] / j.temperature, dim=-1)
                        picked[r] = torch.multinomial(probs, 1, generator=j.generator)[0]
                    else:
                        picked[r] = torch.argmax(logits[r])
            next_ids = picked.tolist()  # the one host sync per step: stopping needs the ids
            for r, j in enumerate(group):
                if j.record_logits:
                    j.logits.append(logits[r].detach().cpu())
                if next_ids[r] == tokenizer.eos_id:
                    j.stop_reason = "eos"
                elif step + 1 >= limits[id(j)]:
                    j.stop_reason = "max_length"
                else:
                    current[id(j)] = next_ids[r]
                if on_step is not None:
                    on_step(j.index, step + 1, limits[id(j)] - 1)
        active = [j for j in active if not j.stop_reason]
        step += 1


@dataclass
class ImageJob:
    """One image to denoise. ``img_uncond`` None means the image-free context equals ``cond``
    (a generation without input picture): its velocity is then the conditional one."""

    index: int
    grid_hw: tuple[int, int]
    x: torch.Tensor  # [h·w, p·p·z], x at t = 1 on entry, the clean latent on return
    position_ids: torch.Tensor  # [h·w]
    cond: CacheSeq
    text_uncond: CacheSeq
    img_uncond: CacheSeq | None
    params: GenerationParams
    schedule: Schedule
    record: bool = False
    trace: dict[str, torch.Tensor] = field(default_factory=dict)
    canceled: bool = False


def branch_names(p: GenerationParams, cfg_on: bool, has_img_context: bool) -> list[str]:
    """The CFG branches a step evaluates. Without an image-free context of its own (a generation
    without think) the image-free velocity is the conditional one — except under TaylorSeer,
    where that branch keeps its own cache state, as the reference evaluates it separately."""
    need_text, need_img = branches_needed(cfg_on, p.cfg_text_scale, p.cfg_img_scale)
    names = ["cond"]
    if need_text:
        names.append("text")
    if need_img and (has_img_context or p.taylorseer):
        names.append("img")
    return names


def _branches(job: ImageJob, step: int) -> list[tuple[str, CacheSeq]]:
    """The CFG branches ``job`` evaluates at ``step``, with their contexts."""
    contexts = {"cond": job.cond, "text": job.text_uncond,
                "img": job.cond if job.img_uncond is None else job.img_uncond}
    names = branch_names(job.params, job.schedule.cfg_on[step], job.img_uncond is not None)
    return [(name, contexts[name]) for name in names]


def _taylor_settings(p: GenerationParams) -> TaylorSettings:
    return TaylorSettings(p.taylorseer_warmup, p.taylorseer_interval, p.taylorseer_order)


def evaluation_plan(job: ImageJob) -> dict[str, list[bool | None]]:
    """Per branch of ``job`` and per step: None (not evaluated), True (full), False (predicted
    by TaylorSeer). Without TaylorSeer every evaluation is full."""
    steps = range(job.schedule.num_steps)
    evaluated = {name: [any(b == name for b, _ in _branches(job, s)) for s in steps] for name in BRANCH_ORDER}
    if not job.params.taylorseer:
        return {name: [True if e else None for e in flags] for name, flags in evaluated.items()}
    settings = _taylor_settings(job.params)
    return {name: branch_schedule(flags, settings) for name, flags in evaluated.items()}


def _chunks(items: list, rows_of: Callable, max_rows: int) -> list[list]:
    chunks, current, rows = [], [], 0
    for item in items:
        n = rows_of(item)
        if current and rows + n > max_rows:
            chunks.append(current)
            current, rows = [], 0
        current.append(item)
        rows += n
    if current:
        chunks.append(current)
    return chunks


def denoise(model: BagelModel, tokenizer: Tokenizer, cache: KVCache, jobs: list[ImageJob],
            counters: Counters, *, progress: ProgressFn | None = None,
            should_cancel: CancelFn | None = None, naive: bool = False,
            max_rows_per_forward: int = 1 << 16) -> None:
    """Run every job's schedule (all jobs share the same timesteps). On return ``job.x`` is the
    final latent of every job not canceled."""
    if not jobs:
        return
    started = time.perf_counter()
    try:
        _denoise_loop(model, tokenizer, cache, jobs, counters, progress, should_cancel, naive, max_rows_per_forward)
    finally:
        if model.device.type == "cuda":
            torch.cuda.synchronize(model.device)  # once per loop, so the loop's wall time is real
        counters.denoise_seconds += time.perf_counter() - started


@dataclass
class _Work:
    """One branch of one image at one step."""

    job: ImageJob
    branch: str
    context: CacheSeq
    full: bool


def _step_work(jobs: list[ImageJob], step: int, plans: dict[int, dict[str, list[bool | None]]]) -> list[_Work]:
    # Branch-major order: blocks over similar contexts sit together, so the batched attention
    # groups them with little padding (every image-free context is short, for instance).
    work = [_Work(j, name, ctx, bool(plans[id(j)][name][step])) for j in jobs for name, ctx in _branches(j, step)]
    return sorted(work, key=lambda w: BRANCH_ORDER[w.branch])


def _groups(work: list[_Work], naive: bool, max_rows: int) -> list[list[_Work]]:
    """The forwards of one step: the full evaluations, one per block (naive) or packed."""
    full = [w for w in work if w.full]
    return [[w] for w in full] if naive else _chunks(full, lambda w: w.job.x.shape[0] + 2, max_rows)


def _denoise_loop(model: BagelModel, tokenizer: Tokenizer, cache: KVCache, jobs: list[ImageJob],
                  counters: Counters, progress: ProgressFn | None, should_cancel: CancelFn | None,
                  naive: bool, max_rows_per_forward: int) -> None:
    """Everything a step needs is on the device and every layout is built before the first
    step: no step reads a device value back or copies host data over (a cancellation, decided
    on the host, re-plans the remaining steps)."""
    schedule = jobs[0].schedule
    assert all(torch.equal(j.schedule.t, schedule.t) for j in jobs), "denoise groups share one schedule"
    device = model.device
    t_all, dt_all = schedule.t.to(device), schedule.dt.to(device)
    positions = {id(j): j.position_ids.to(device) for j in jobs}
    plans = {id(j): evaluation_plan(j) for j in jobs}
    states = {(id(j), name): TaylorState(_taylor_settings(j.params))
              for j in jobs if j.params.taylorseer for name in BRANCH_ORDER}
    for j in jobs:
        if j.record and j.params.taylorseer:
            j.trace["taylorseer_schedule"] = plans[id(j)]
    # The packed layout only changes when a branch switches on/off (cfg_interval, TaylorSeer) or
    # a request is canceled: one per distinct work list, all built up front.
    layouts: dict[tuple, tuple[PackedBatch, list[Block]]] = {}
    for step in range(schedule.num_steps):
        for group in _groups(_step_work(jobs, step, plans), naive, max_rows_per_forward):
            _layout(layouts, group, tokenizer, cache, device)
    for step in range(schedule.num_steps):
        if should_cancel is not None:
            for j in jobs:
                if not j.canceled and should_cancel(j.index):
                    j.canceled = True
        active = [j for j in jobs if not j.canceled]
        if not active:
            return
        work = _step_work(active, step, plans)
        t = t_all[step:step + 1]
        evaluated = [j for j in active if any(w.job is j and w.full for w in work)]
        job_rows = {}
        if evaluated:
            rows = model.embed_latents(torch.cat([j.x for j in evaluated]), t,
                                       torch.cat([positions[id(j)] for j in evaluated]))
            job_rows = dict(zip((id(j) for j in evaluated), rows.split([j.x.shape[0] for j in evaluated])))
        velocities: dict[tuple[int, str], torch.Tensor] = {}
        for group in _groups(work, naive, max_rows_per_forward):
            batch, blocks = _layout(layouts, group, tokenizer, cache, device)
            text_rows = model.language_model.embed(batch.text_ids)
            x = text_rows.new_zeros(batch.length, text_rows.shape[1])
            x[batch.text_index] = text_rows
            x[batch.row_index["latent"]] = torch.cat([job_rows[id(w.job)] for w in group])
            last = model.language_model(x, batch, cache, final_norm=False).index_select(0, batch.row_index["latent"])
            counters.forward({w.job.index for w in group})
            counters.denoise_forward_rows += batch.length
            for w, y in zip(group, last.split([b.num_rows for b in blocks])):
                state = states.get((id(w.job), w.branch))
                if state is not None:
                    state.record_full(y)
                velocities[(id(w.job), w.branch)] = model.latent_velocity(y)
                counters.block(w.job.index, full=True)
        for w in work:
            if not w.full:
                velocities[(id(w.job), w.branch)] = model.latent_velocity(states[(id(w.job), w.branch)].predict())
                counters.block(w.job.index, full=False)
        dt = dt_all[step]
        for j in active:
            p = j.params
            v_cond = velocities[(id(j), "cond")]
            v_text = velocities.get((id(j), "text"))
            v_img = velocities.get((id(j), "img"), v_cond if j.img_uncond is None else None)
            v = guided_velocity(v_cond, v_text, v_img, cfg_on=j.schedule.cfg_on[step],
                                text_scale=p.cfg_text_scale, img_scale=p.cfg_img_scale,
                                renorm_type=p.cfg_renorm_type, renorm_min=p.cfg_renorm_min)
            if j.record:
                _record(j, step, v_cond, v_text, v_img, v)
            j.x = euler_step(j.x, v, dt)
            if progress is not None:
                progress(j.index, step + 1, schedule.num_steps)


def _layout(layouts: dict, group: list[_Work], tokenizer: Tokenizer, cache: KVCache,
            device: torch.device) -> tuple[PackedBatch, list[Block]]:
    """The packed layout of one denoising forward over ``group`` (built on first use)."""
    key = tuple((id(w.job), w.branch) for w in group)
    if key not in layouts:
        builder = PackBuilder(cache)
        blocks = []
        for w in group:
            _, block = builder.add_image_block("latent", w.job.x.shape[0], w.context, tokenizer.start_of_image_id,
                                               tokenizer.end_of_image_id, write=False)
            blocks.append(block)
        # Query blocks are not cached, but the batched attention reads every key from the
        # cache: park them in scratch slots, reserved once per loop and reused by every layout.
        scratch = layouts.get("scratch")
        need = builder.scratch_slots()
        batched = builder.uniform_rows() is not None or cache.is_paged
        if batched and (scratch is None or scratch[1] < need):
            scratch = layouts["scratch"] = (cache.allocate(need), need)
        start = scratch[0] if batched else None
        layouts[key] = (builder.build(device, scratch_start=start), blocks)
    return layouts[key]


def _record(job: ImageJob, step: int, v_cond: torch.Tensor, v_text: torch.Tensor | None,
            v_img: torch.Tensor | None, v: torch.Tensor) -> None:
    if step == 0:
        job.trace["first_step_v_cond"] = v_cond.cpu()
        job.trace["first_step_v_t"] = v.cpu()
        if v_text is not None:
            job.trace["first_step_v_text_uncond"] = v_text.cpu()
        if v_img is not None:
            job.trace["first_step_v_img_uncond"] = v_img.cpu()
    job.trace.setdefault("v_steps", []).append(v.cpu())
