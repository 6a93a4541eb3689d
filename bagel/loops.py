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


def _branches(job: ImageJob, step: int) -> list[tuple[str, CacheSeq]]:
    p = job.params
    need_text, need_img = branches_needed(job.schedule.cfg_on[step], p.cfg_text_scale, p.cfg_img_scale)
    out = [("cond", job.cond)]
    if need_text:
        out.append(("text", job.text_uncond))
    if need_img and job.img_uncond is not None:
        out.append(("img", job.img_uncond))
    return out


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


def _denoise_loop(model: BagelModel, tokenizer: Tokenizer, cache: KVCache, jobs: list[ImageJob],
                  counters: Counters, progress: ProgressFn | None, should_cancel: CancelFn | None,
                  naive: bool, max_rows_per_forward: int) -> None:
    schedule = jobs[0].schedule
    assert all(torch.equal(j.schedule.t, schedule.t) for j in jobs), "denoise groups share one schedule"
    device = model.device
    t_all = schedule.t.to(device)
    positions = {id(j): j.position_ids.to(device) for j in jobs}
    # The packed layout only changes when a branch switches on/off (cfg_interval) or a request is
    # canceled: build it once per distinct work list, not every step (no host→device copy per step).
    layouts: dict[tuple, tuple[PackedBatch, list[Block]]] = {}
    for step in range(schedule.num_steps):
        if should_cancel is not None:
            for j in jobs:
                if not j.canceled and should_cancel(j.index):
                    j.canceled = True
        active = [j for j in jobs if not j.canceled]
        if not active:
            return
        t = t_all[step:step + 1]
        rows = model.embed_latents(torch.cat([j.x for j in active]), t,
                                   torch.cat([positions[id(j)] for j in active]))
        job_rows = dict(zip((id(j) for j in active), rows.split([j.x.shape[0] for j in active])))
        # Branch-major order: blocks over similar contexts sit together, so the batched attention
        # groups them with little padding (every image-free context is short, for instance).
        work = sorted(((j, name, ctx) for j in active for name, ctx in _branches(j, step)),
                      key=lambda w: BRANCH_ORDER[w[1]])
        groups = ([[w] for w in work] if naive
                  else _chunks(work, lambda w: w[0].x.shape[0] + 2, max_rows_per_forward))
        velocities: dict[tuple[int, str], torch.Tensor] = {}
        for group in groups:
            batch, blocks = _layout(layouts, group, tokenizer, cache, device)
            text_rows = model.language_model.embed(batch.text_ids)
            x = text_rows.new_zeros(batch.length, text_rows.shape[1])
            x[batch.text_index] = text_rows
            x[batch.row_index["latent"]] = torch.cat([job_rows[id(j)] for j, _, _ in group])
            hidden = model.language_model(x, batch, cache)
            v_all = model.velocity(hidden.index_select(0, batch.row_index["latent"])).float()
            counters.forward({j.index for j, _, _ in group})
            counters.denoise_forward_rows += batch.length
            for (j, name, _), v in zip(group, v_all.split([b.num_rows for b in blocks])):
                velocities[(id(j), name)] = v
        dt = schedule.dt[step]
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


def _layout(layouts: dict, group: list, tokenizer: Tokenizer, cache: KVCache,
            device: torch.device) -> tuple[PackedBatch, list[Block]]:
    """The packed layout of one denoising forward over ``group`` ``[(job, branch, context)]``."""
    key = tuple((id(j), name) for j, name, _ in group)
    if key not in layouts:
        builder = PackBuilder(cache)
        blocks = []
        for j, _, ctx in group:
            _, block = builder.add_image_block("latent", j.x.shape[0], ctx, tokenizer.start_of_image_id,
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
