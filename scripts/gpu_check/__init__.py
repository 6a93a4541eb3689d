"""gpu_check: the checks and timings behind ``scripts/gpu-check``, an operations tool that runs
the engine on a real GPU once, within a fixed time, and leaves a report.

Modules: ``runner`` (options, the deadline, one try/except per check, the JSON report and its
table), ``suite`` (the checks in order with their planned costs), ``plan`` (what each size runs
and what it should cost), ``engines`` (one engine alive at a time), ``scenarios`` (the requests:
pictures, prompts, the try-on chunk), ``attention_check``, ``model_checks``, ``oom_check``,
``offload_check`` and ``timings`` (the checks themselves). Lives outside ``bagel/`` and
``worker/``: it imports both, neither imports it.
"""
