"""The engine: ``Engine.load(path)`` then ``engine.run([Request | InterleavedRequest, ...]) ->
[Result, ...]``.

Owns: the loaded modules, device and dtype; validating every request before any model work
(errors name ``requests[i].<field>``, the value and the limit); seeding one generator per
request; and running a list of requests — the fixed tasks and interleaved ones
(``interleaved.py``) mixed — as numbered steps:

  1. validate and plan every request (pictures resized, prompts tokenized, sizes snapped);
  2. name every VAE block: an edit's picture with its posterior noise (its generator's first
     draw, as in the reference, drawn now; or its own ``context_seed``), an interleaved
     request's pictures with their own seeds (``pictures.py``);
  3. write the rows of each saved context handed in (``run(..., contexts=...)``) into the
     cache as far as it agrees with its request (``saved_contexts.py``); run the VAE encoder
     once per distinct picture a context still needs and sample one latent per distinct
     noise; prefill every context of every request, sharing common prefixes
     (``contexts.py``); with ``keep_contexts``, copy each interleaved request's main context
     out (``Result.context``);
  4. decode all texts together: understanding answers and think texts (``loops.py``);
  5. append each think text to its request's main context;
  6. draw the initial noise and denoise every image, requests with the same schedule in one
     packed forward per step with all their CFG branches (``loops.py``);
  7. decode latents to pictures and assemble the results;
  8. quality gate: for every request with ``gate_questions`` and a picture, ask the
     understanding path each question about that picture and score the first answer token's
     yes / no probabilities (``gate.py``): the result pictures resized as input pictures are,
     an input picture's SigLIP rows reused, every question of the run prefilled together and
     answered by one decode forward.

Contexts per task (the reference's ``interleave_inference``): understand — [think prompt],
pictures (ViT only), question. Generate — main [think prompt], prompt; text-free CFG = [think
prompt]; image-free CFG = main before the think text. Edit — main [think prompt], picture
(VAE block, then ViT block), instruction; text-free CFG = everything before the instruction;
image-free CFG = [think prompt], instruction. Gate question — the request's input pictures
(ViT only), its result picture (ViT only), question: understand's context for those pictures.
An interleaved request — the same rules over any sequence of texts and pictures — is in
``interleaved.py``; a text output decodes like understand, an image output denoises like
generate/edit.

Sizes: a generate request's width and height are snapped to the nearest multiple of the
16-px latent stride (at least 16); a side beyond ``max_image_side_px`` (max_latent_size·16,
1024 px for BAGEL-7B-MoT) is an error. An edit's output has the VAE-resized input's size.
Token limits: ``max_new_tokens`` bounds an understanding reply (with think: the whole reply,
reasoning included), ``max_think_tokens`` a generate/edit think text; both count returned tokens.

``mode="naive"`` (or ``run(..., naive=True)``) runs requests one at a time with one forward
per context item, decode step and CFG branch — the reference's shape, kept as the baseline
of the throughput benchmark. Batched and naive results agree within float tolerance.

Memory: with ``memory_budget_bytes`` set, a batch whose estimate (each request's counts from
``plans.py``, in bytes by ``memory.py``; weights excluded, the gate included) exceeds the
budget runs as consecutive sub-batches that fit, and a request that cannot fit alone raises
``MemoryBudgetError`` before any model work. ``memory_estimate`` states a batch's estimate by
part; the difference for one more request is its cost.

``Result.stats``: ``seed``, ``model_seconds`` (the whole ``run``), ``llm_forwards`` and
``context_encodes`` (this request's share: a forward counts for every request with rows in
it, a picture's encode for the first request that uses it — a gated result picture's SigLIP
encode included), ``run_llm_forwards``, ``run_context_encodes``, ``run_denoise_forward_tokens``,
``run_prefill_rows`` (rows of the context prefill forwards, the gate's included) and
``run_gate_llm_forwards`` (the gate's share of ``run_llm_forwards``) of the batch the request
ran in (the whole call, or its sub-batch under a memory budget, or itself in naive mode);
``context_reused_parts`` and ``prefill_rows_saved`` (the leading parts and the rows of a saved
context the request read instead of prefilling them; 0 without); ``run_batches`` and
``denoise_seconds`` (wall time of every denoising loop of the call, summed);
``phase_<name>_seconds`` for the call's phases ``encode``, ``prefill``, ``think`` (generated
text: think and answers), ``denoise``, ``decode`` (VAE decode and pictures) and ``gate`` (only
in a run with gate questions), whole-call wall times like ``model_seconds``.

Departures from the reference: batching and prefix sharing as above; understanding requests
skip the image-free context the reference builds but never reads; posterior noise is shared
by requests that use the same picture and the same seed, ``context_seed`` or injected noise,
so their whole picture context is prefilled once; the VAE encoder runs once per picture
whatever the number of noises (the reference encodes per request); the quality gate and
saved contexts are ours.
"""

from __future__ import annotations

import contextlib
import logging
import secrets
import time
from collections.abc import Iterator
from pathlib import Path

import torch

from bagel import gate, interleaved, saved_contexts, transforms
from bagel.attention import Attention, resolve_attention
from bagel.config import ModelConfig
from bagel.contexts import (
    ContextStore,
    Counters,
    TextItem,
    VaeItem,
    VitItem,
)
from bagel.errors import InputError
from bagel.kv_cache import KVCache
from bagel.loading import LoadedCheckpoint, load_checkpoint, resolve_device
from bagel.loops import ImageJob, TextJob, decode_texts, denoise, reply_text
from bagel.memory import Footprint, MemoryEstimate, MemoryModel, split_to_budget
from bagel.pictures import (
    LatentSpec,
    check_init_noise,
    encode_latents,
    noise_shape,
    noised,
    prepare_picture,
    seeded,
    snap_side,
)
from bagel.plans import Plan, footprint
from bagel.prompts import think_system_prompt
from bagel.requests import CancelFn, InterleavedRequest, ProgressFn, Request, Result
from bagel.sampler import make_schedule
from bagel.saved_contexts import SavedContext, owner_key
from bagel.tiny import random_checkpoint

logger = logging.getLogger(__name__)

MODES = ("batched", "naive")
THINK_END = "</think>"


def _default_dtype(device: torch.device) -> torch.dtype:
    """bfloat16 on CUDA (what the real weights are), float32 elsewhere (CPU kernels)."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


class Engine:
    """BAGEL inference on one device. Thread-compatible, not thread-safe: one ``run`` at a time."""

    def __init__(self, checkpoint: LoadedCheckpoint, *, mode: str = "batched",
                 max_rows_per_forward: int = 1 << 16, memory_budget_bytes: int | None = None,
                 attention: str | Attention = "auto") -> None:
        if mode not in MODES:
            raise InputError(f"mode: {mode!r} is not one of {MODES}")
        if memory_budget_bytes is not None and (isinstance(memory_budget_bytes, bool)
                                                or not isinstance(memory_budget_bytes, int)
                                                or memory_budget_bytes <= 0):
            raise InputError(f"memory_budget_bytes: {memory_budget_bytes!r} must be a positive number of bytes")
        self.checkpoint = checkpoint
        self.model = checkpoint.model
        self.vae = checkpoint.vae
        self.mode = mode
        self.max_rows_per_forward = max_rows_per_forward
        self.memory_budget_bytes = memory_budget_bytes
        self.attention = resolve_attention(attention, checkpoint.device, checkpoint.dtype)
        self.model.language_model.model.attention = self.attention
        self._answer_ids: gate.AnswerIds | None = None  # the gate's yes/no tokens, found on first use
        self._memory_model = MemoryModel(checkpoint.config, checkpoint.dtype, max_rows_per_forward,
                                         page_size=self.attention.page_size,
                                         gathers_keys=self.attention.gathers_keys)

    @classmethod
    def load(cls, path: str | Path, quantization: str = "none", device: str | torch.device = "auto",
             dtype: torch.dtype | str | None = None, *, mode: str = "batched", offload: str = "none",
             memory_budget_bytes: int | None = None, attention: str | Attention = "auto") -> Engine:
        """Load a checkpoint folder. ``device="auto"``: CUDA when available, else CPU; ``dtype``
        defaults to float32 on CPU and bfloat16 on CUDA. ``offload="layers"``: decoder layers in
        host memory, streamed to the device as they run (``offload.py``). ``memory_budget_bytes``:
        the working memory (weights excluded, ``memory.py``) one batch may use; a larger batch
        runs as sub-batches, a request that cannot fit alone raises ``MemoryBudgetError``."""
        dev = resolve_device(device)
        checkpoint = load_checkpoint(path, device=dev, dtype=_default_dtype(dev) if dtype is None else dtype,
                                     quantization=quantization, offload=offload)
        return cls(checkpoint, mode=mode, memory_budget_bytes=memory_budget_bytes, attention=attention)

    @classmethod
    def random(cls, size: str, *, device: str | torch.device = "auto", dtype: torch.dtype | str | None = None,
               quantization: str = "none", seed: int = 0, mode: str = "batched", offload: str = "none",
               memory_budget_bytes: int | None = None, attention: str | Attention = "auto") -> Engine:
        """An engine on a random checkpoint of ``tiny.py``'s preset ``size`` ("tiny", "small", or
        "full": BAGEL-7B-MoT's real shapes), made straight on the device without touching disk
        and loaded through the same streamed path as ``load`` (``tiny.random_checkpoint``): the
        real model's time and memory without its weights. Options as in ``load``; a seed gives
        the same weights on a given device."""
        dev = resolve_device(device)
        checkpoint = random_checkpoint(size, device=dev, dtype=_default_dtype(dev) if dtype is None else dtype,
                                       quantization=quantization, seed=seed, offload=offload)
        return cls(checkpoint, mode=mode, memory_budget_bytes=memory_budget_bytes, attention=attention)

    @property
    def config(self) -> ModelConfig:
        return self.checkpoint.config

    @property
    def device(self) -> torch.device:
        return self.checkpoint.device

    @property
    def dtype(self) -> torch.dtype:
        return self.checkpoint.dtype

    @property
    def tokenizer(self):
        return self.checkpoint.tokenizer

    @property
    def max_image_side_px(self) -> int:
        return self.config.constants.max_image_side_px(self.config.vae)

    @property
    def latent_stride_px(self) -> int:
        return self.config.constants.latent_downsample(self.config.vae)

    # ---- step 1: validation -------------------------------------------------------------

    def _plan(self, i: int, req: Request | InterleavedRequest) -> Plan:
        where = f"requests[{i}]"
        if not isinstance(req, Request | InterleavedRequest):
            raise InputError(f"{where}: a bagel.requests.Request or InterleavedRequest is required, "
                             f"got {type(req).__name__}")
        p = req.params
        seed = p.seed if p.seed is not None else secrets.randbits(63)
        gen = torch.Generator(device=self.device).manual_seed(seed)
        if isinstance(req, InterleavedRequest):
            return interleaved.plan(i, req, seed, gen, self.config, self.tokenizer)
        pictures = [prepare_picture(img, f"{where}.images[{k}]", self.config) for k, img in enumerate(req.images)]
        plan = Plan(i, req, seed, gen, pictures)
        n_tokens = len(self.tokenizer.encode(req.prompt)) + 2
        think = p.max_think_tokens + 2 if req.think else 0
        limit = self.config.llm.max_position_embeddings
        if n_tokens + think + 256 > limit:
            raise InputError(f"{where}.prompt: {n_tokens} tokens (+{think} think tokens) exceed the "
                             f"{limit}-position context of the model")
        if req.task == "generate":
            plan.out_hw = (snap_side(req.height, f"{where}.height", self.config),
                           snap_side(req.width, f"{where}.width", self.config))
        elif req.task == "edit":
            w, h = pictures[0].vae_image.size
            plan.out_hw = (h, w)
            expected = noise_shape(pictures[0], self.config)
            if req.posterior_noise is not None and tuple(req.posterior_noise.shape) != expected:
                raise InputError(f"{where}.posterior_noise: shape {tuple(req.posterior_noise.shape)} given, "
                                 f"expected {expected} for the {w}x{h} px resized input")
        if req.posterior_noise is not None and req.task != "edit":
            raise InputError(f"{where}.posterior_noise: only an edit encodes its input picture with the VAE")
        check_init_noise(req.init_noise, plan.out_hw, f"{where}.init_noise", self.config)
        if req.gate_questions:
            self._gate_ids()  # a tokenizer the gate cannot score with fails here, before any model work
        return plan

    # ---- the run ------------------------------------------------------------------------

    def run(self, requests: list[Request | InterleavedRequest], progress: ProgressFn | None = None,
            should_cancel: CancelFn | None = None, naive: bool | None = None, *, keep_contexts: bool = False,
            contexts: list[SavedContext | None] | None = None) -> list[Result]:
        """Run ``requests``; one ``Result`` per request, in order. Raises ``InputError`` (nothing
        computed) when any request is invalid. ``keep_contexts``: set ``Result.context`` of each
        interleaved request to its saved main context. ``contexts``: one saved context (or None)
        per request, read as the prefilled start of its request's main context as far as their
        leading parts agree (checked; nothing in common: ignored, see ``saved_contexts.py``)."""
        results, _ = self.run_traced(requests, progress=progress, should_cancel=should_cancel, naive=naive,
                                     keep_contexts=keep_contexts, contexts=contexts)
        return results

    def run_traced(self, requests: list[Request | InterleavedRequest], *, progress: ProgressFn | None = None,
                   should_cancel: CancelFn | None = None, naive: bool | None = None, record: bool = False,
                   keep_contexts: bool = False, contexts: list[SavedContext | None] | None = None,
                   ) -> tuple[list[Result], list[dict]]:
        """``run`` that also returns, per request, the intermediate values the parity verifier
        compares (decode logits, first-step CFG branches, final latent, raw decoder output)."""
        if not isinstance(requests, list | tuple) or not requests:
            raise InputError("requests: a non-empty list of Request or InterleavedRequest is required")
        given = saved_contexts.check_list(contexts, len(requests))
        plans = [self._plan(i, r) for i, r in enumerate(requests)]  # 1. validate everything first
        for plan, saved in zip(plans, given):
            plan.keep_context = keep_contexts and plan.is_interleaved
            plan.given_context = saved if plan.is_interleaved else None
        naive = self.mode == "naive" if naive is None else naive
        started = time.perf_counter()
        batches = [[plan] for plan in plans] if naive else [plans]
        if self.memory_budget_bytes is not None:  # still before any model work
            batches = [sub for batch in batches
                       for sub in split_to_budget(batch, self._footprint, self._memory_model,
                                                  self.memory_budget_bytes, lambda pl: f"requests[{pl.index}]")]
            if len(batches) > 1 and not naive:
                logger.info("memory budget: %d requests run as %d sub-batches", len(plans), len(batches))
        owner = owner_key(self.model, self.config, self.dtype, self.device)
        with torch.inference_mode():
            outcomes = []
            for batch in batches:
                outcomes += self._execute(batch, progress, should_cancel, naive=naive, record=record, owner=owner)
        seconds = time.perf_counter() - started
        runs = {id(c): c for _, c in outcomes}.values()
        denoise_seconds = sum(c.denoise_seconds for c in runs)
        phases: dict[str, float] = {}
        for c in runs:
            for name, value in c.phase_seconds.items():
                phases[name] = phases.get(name, 0.0) + value
        results = []
        for plan, (result, counters) in zip(plans, outcomes):
            result.context = plan.saved
            result.stats.update({
                "seed": plan.seed, "model_seconds": seconds,
                "llm_forwards": counters.llm_forwards.get(plan.index, 0),
                "context_encodes": counters.context_encodes.get(plan.index, 0),
                "run_llm_forwards": counters.run_llm_forwards,
                "run_context_encodes": counters.run_context_encodes,
                "run_prefill_rows": counters.prefill_rows,
                "context_reused_parts": plan.reused_parts,
                "prefill_rows_saved": plan.rows_saved,
                "denoise_seconds": denoise_seconds,
                "run_batches": len(batches),
                "run_denoise_forward_tokens": counters.denoise_forward_rows,
                "denoise_blocks_full": counters.blocks_full.get(plan.index, 0),
                "denoise_blocks_cached": counters.blocks_cached.get(plan.index, 0),
                **{f"phase_{name}_seconds": value for name, value in phases.items()},
            })
            results.append(result)
        logger.info("ran %d requests in %.2f s (%s)", len(plans), seconds, "naive" if naive else "batched")
        return results, [p.trace for p in plans]

    def _execute(self, plans: list[Plan], progress: ProgressFn | None, should_cancel: CancelFn | None,
                 *, naive: bool, record: bool, owner: str) -> list[tuple[Result, Counters]]:
        cfg = self.config.llm
        counters = Counters()
        cache = KVCache(cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim,
                        self._capacity_estimate(plans), self.device, self.dtype,
                        page_size=self.attention.page_size)
        store = ContextStore(self.model, self.tokenizer, cache, counters, naive=naive)
        with self._phase(counters, "encode"):
            specs = self._latent_specs(plans, store)  # 2.
        self._build_paths(plans)
        paths, owners = [], []
        for plan in plans:
            for path in (plan.main, plan.text_uncond, plan.img_uncond):
                if path:
                    paths.append(path)
                    owners.append(plan.index)
        with self._phase(counters, "prefill"):  # 3. saved contexts first: only the rest is prefilled
            for plan in plans:
                if plan.given_context is not None:
                    plan.reused_parts, plan.rows_saved = saved_contexts.restore(
                        plan.given_context, store, owner, plan.part_keys, plan.main)
        with self._phase(counters, "encode"):
            needed = {item.latent_key for path in paths for d, item in enumerate(path)
                      if isinstance(item, VaeItem) and not store.has(path[:d + 1])}
            encode_latents(self.vae, self.config, self.device, [s for s in specs if s.key in needed], store,
                           counters)
        with self._phase(counters, "prefill"):
            store.prefill(paths, owners)
        for plan in plans:
            if plan.keep_context:
                plan.saved = saved_contexts.save(store, plan.main, plan.part_keys, plan.part_ends, owner)
        with self._phase(counters, "think"):
            self._decode(plans, store, cache, counters, should_cancel, progress, naive, record)  # 4.
        think_paths = []  # 5.
        for plan in plans:
            if plan.think_text is not None and not plan.canceled:
                plan.main = (*plan.main, TextItem(plan.think_text))
                think_paths.append((plan.main, plan.index))
        if think_paths:
            with self._phase(counters, "prefill"):
                store.prefill([p for p, _ in think_paths], [o for _, o in think_paths])
        with self._phase(counters, "denoise"):
            self._denoise(plans, store, cache, counters, progress, should_cancel, naive, record)  # 6.
        with self._phase(counters, "decode"):
            results = [self._result(plan, record) for plan in plans]  # 7.
        forwards = counters.run_llm_forwards
        if any(plan.gate_questions for plan in plans):  # no "gate" phase in a run without it
            with self._phase(counters, "gate"):
                self._gate(plans, results, store, cache, counters, naive)  # 8.
        for result in results:
            result.stats["run_gate_llm_forwards"] = counters.run_llm_forwards - forwards
        return [(result, counters) for result in results]

    @contextlib.contextmanager
    def _phase(self, counters: Counters, name: str) -> Iterator[None]:
        """Add the wall time of the block to ``counters.phase_seconds[name]`` (the device synced
        at both ends on CUDA: a handful of syncs per run, none inside a denoising step)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        started = time.perf_counter()
        try:
            yield
        finally:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            counters.phase_seconds[name] = counters.phase_seconds.get(name, 0.0) + time.perf_counter() - started

    def _capacity_estimate(self, plans: list[Plan]) -> int:
        """KV slots the run reserves: every request's own tokens (an interleaved request's
        imported rows among them), shared pictures once, and the denoising scratch."""
        return self._memory_model.kv_slots([self._footprint(plan) for plan in plans])

    def _footprint(self, plan: Plan) -> Footprint:
        return footprint(plan, self.tokenizer, self.config)

    def memory_estimate(self, requests: list[Request | InterleavedRequest], *,
                        keep_contexts: bool = False) -> MemoryEstimate:
        """Estimated peak working memory (bytes, weights excluded) of ``run(requests,
        keep_contexts=keep_contexts)`` in one batch. The difference between n and n+1 similar
        requests is the cost of one more."""
        plans = [self._plan(i, r) for i, r in enumerate(requests)]
        for plan in plans:
            plan.keep_context = keep_contexts and plan.is_interleaved
        return self._memory_model.estimate([self._footprint(plan) for plan in plans])

    # ---- steps 2-3: pictures and contexts -------------------------------------------------

    def _latent_specs(self, plans: list[Plan], store: ContextStore) -> list[LatentSpec]:
        """Every plan's VAE blocks: an edit's picture with the noise of its ``posterior_noise``,
        its ``context_seed`` or its generator's first draw (drawn now, before the initial
        noise, as in the reference); an interleaved request's pictures with their own seeds.
        Also registers every input picture for SigLIP."""
        specs = []
        for plan in plans:
            for pic in plan.pictures:
                store.vit_inputs.setdefault(pic.key, pic.vit)
            req = plan.request
            if plan.is_interleaved:
                plan.latents = interleaved.latent_specs(plan)
            elif req.task == "edit":
                pic = plan.pictures[0]
                if req.posterior_noise is not None:
                    plan.latents = [noised(pic, req.posterior_noise, plan.index)]
                elif req.context_seed is not None:
                    plan.latents = [seeded(pic, req.context_seed, plan.index)]
                else:
                    noise = torch.randn(noise_shape(pic, self.config), generator=plan.generator, device=self.device)
                    plan.latents = [noised(pic, noise, plan.index)]
            specs += plan.latents
        return specs

    def _build_paths(self, plans: list[Plan]) -> None:
        for plan in plans:
            req = plan.request
            if plan.is_interleaved:
                interleaved.build_paths(plan)
                continue
            head = (TextItem(think_system_prompt(req.task)),) if req.think else ()
            prompt = TextItem(req.prompt)
            if req.task == "understand":
                plan.main = (*head, *(VitItem(pic.key) for pic in plan.pictures), prompt)
                plan.text_uncond, plan.img_uncond = (), None
            elif req.task == "generate":
                plan.main = (*head, prompt)
                plan.text_uncond = head
                plan.img_uncond = plan.main if req.think else None  # None: identical to the main context
            else:
                picture = (VaeItem(plan.latents[0].key), VitItem(plan.pictures[0].key))
                plan.main = (*head, *picture, prompt)
                plan.text_uncond = (*head, *picture)
                plan.img_uncond = (*head, prompt)


    # ---- step 4: text ---------------------------------------------------------------------

    def _decode(self, plans: list[Plan], store: ContextStore, cache: KVCache, counters: Counters,
                should_cancel: CancelFn | None, progress: ProgressFn | None, naive: bool, record: bool) -> None:
        jobs = []
        for plan in plans:
            req, p = plan.request, plan.request.params
            if plan.output != "text" and not req.think:
                continue
            limit = p.max_new_tokens if plan.output == "text" else p.max_think_tokens
            plan.text_job = TextJob(plan.index, store.get(plan.main), limit, p.do_sample, p.text_temperature,
                                    plan.generator, record_logits=record)
            jobs.append(plan.text_job)
        if not jobs:
            return
        understand = {pl.index for pl in plans if pl.output == "text"}

        def report_answer_step(index: int, step: int, total: int) -> None:
            # Progress of an understanding request is its decode; a think text precedes the
            # denoising steps, which report themselves.
            if progress is not None and index in understand:
                progress(index, step, total)

        decode_texts(self.model, self.tokenizer, cache, jobs, counters, should_cancel=should_cancel,
                     on_step=report_answer_step, naive=naive)
        for plan in plans:
            job = plan.text_job
            if job is None:
                continue
            if job.canceled:
                plan.canceled = True
                continue
            text = reply_text(self.tokenizer, job.fed)
            if plan.output == "text":
                plan.reply = text
            else:
                plan.think_text = text
            if record:
                plan.trace.update(generated_ids=job.generated_ids, stop_reason=job.stop_reason,
                                  step_logits=torch.stack(job.logits) if job.logits else None, raw_text=text)

    # ---- step 6: images -------------------------------------------------------------------

    def _denoise(self, plans: list[Plan], store: ContextStore, cache: KVCache, counters: Counters,
                 progress: ProgressFn | None, should_cancel: CancelFn | None, naive: bool, record: bool) -> None:
        consts, stride = self.config.constants, self.latent_stride_px
        lp, z = consts.latent_patch_size, self.config.vae.z_channels
        groups: dict[tuple, list[ImageJob]] = {}
        for plan in plans:
            req, p = plan.request, plan.request.params
            if plan.output == "text" or plan.canceled:
                continue
            h, w = plan.out_hw[0] // stride, plan.out_hw[1] // stride
            noise = req.init_noise
            if noise is None:
                noise = torch.randn((h * w, lp * lp * z), generator=plan.generator, device=self.device)
            schedule = make_schedule(p.num_timesteps, p.timestep_shift, p.cfg_interval)
            img_uncond = None if plan.img_uncond is None else store.get(plan.img_uncond)
            job = ImageJob(plan.index, (h, w), noise.to(self.device, torch.float32),
                           transforms.grid_position_ids(h, w, consts.max_latent_size),
                           store.get(plan.main), store.get(plan.text_uncond), img_uncond, p, schedule,
                           record=record)
            plan.image_job = job
            groups.setdefault((p.num_timesteps, p.timestep_shift), []).append(job)
        for jobs in groups.values():
            denoise(self.model, self.tokenizer, cache, jobs, counters, progress=progress,
                    should_cancel=should_cancel, naive=naive, max_rows_per_forward=self.max_rows_per_forward)

    # ---- step 7: results ------------------------------------------------------------------

    def decode_latent(self, packed: torch.Tensor, grid_hw: tuple[int, int]) -> torch.Tensor:
        """Packed latent ``[h·w, p·p·z]`` → raw decoder output ``[1, 3, 16h, 16w]``."""
        lp, z = self.config.constants.latent_patch_size, self.config.vae.z_channels
        latent = transforms.unpack_latent(packed.to(self.device), grid_hw[0], grid_hw[1], lp, z)
        return self.vae.decode(latent)

    def _result(self, plan: Plan, record: bool) -> Result:
        job = plan.image_job
        if plan.canceled or (job is not None and job.canceled):
            return Result(canceled=True, think_text=plan.think_text)
        if plan.output == "text":
            think, answer = None, plan.reply
            if plan.request.think and THINK_END in plan.reply:
                reasoning, answer = plan.reply.split(THINK_END, 1)
                think, answer = reasoning.replace("<think>", "").strip(), answer.strip()
            return Result(text=answer, think_text=think)
        raw = self.decode_latent(job.x, job.grid_hw)
        image = transforms.tensor_to_image(raw[0])
        if record:
            plan.trace.update(job.trace, final_latent=job.x.cpu(), decode_out_raw=raw.float().cpu())
        return Result(image=image, think_text=plan.think_text)

    # ---- step 8: quality gate -------------------------------------------------------------

    def _gate_ids(self) -> gate.AnswerIds:
        """The tokens the gate scores as yes and no (``gate.answer_ids``), found once."""
        if self._answer_ids is None:
            self._answer_ids = gate.answer_ids(self.tokenizer)
        return self._answer_ids

    def _gate(self, plans: list[Plan], results: list[Result], store: ContextStore, cache: KVCache,
              counters: Counters, naive: bool) -> None:
        """Score every gate question of every plan whose result has a picture, all together."""
        questions, gated = [], {}
        for plan, result in zip(plans, results):
            if not plan.gate_questions or result.image is None:
                continue
            result.gate, gated[plan.index] = [], result
            # the decoded picture itself (no PNG round trip), resized as an input picture is
            picture = prepare_picture(result.image, f"requests[{plan.index}].image", self.config)
            store.vit_inputs.setdefault(picture.key, picture.vit)
            inputs = [pic.key for pic in plan.pictures]
            questions += [gate.GateQuestion(plan.index, text, gate.question_path(inputs, picture.key, text))
                          for text in plan.request.gate_questions]
        if not questions:
            return
        answers = gate.score(self.model, self.tokenizer, cache, store, questions, self._gate_ids(), counters,
                             naive=naive)
        for question, answer in zip(questions, answers):
            gated[question.index].gate.append(answer)
