"""Errors raised by the engine. Each has a stable ``code`` the service stores on the job row.

Permanent errors (bad input, bad checkpoint) must never be retried; the service maps
``InputError`` to a 4xx/`failed` job and ``CheckpointError`` to a worker that refuses to start.
"""


class BagelError(Exception):
    """Base class of every error raised by ``bagel``."""

    code = "bagel_error"


class CheckpointError(BagelError):
    """Raised when a checkpoint folder is missing files, or holds missing, unexpected or
    mis-shaped tensors; the message names the file and the first offending keys."""

    code = "bad_checkpoint"


class InputError(BagelError):
    """Raised when a request is invalid: non-image bytes, a truncated image, a size over the
    model's maximum, an empty prompt, a hyper-parameter out of range. The message names the
    field, the value and the limit."""

    code = "invalid_input"


class CanceledError(BagelError):
    """Raised when a request's ``should_cancel`` callback returned True between steps."""

    code = "canceled"


class MemoryBudgetError(BagelError):
    """Raised when a batch cannot fit the configured memory budget even one request at a time."""

    code = "memory_budget"


class AdapterError(InputError):
    """Raised when a LoRA adapter is refused: an unsupported ``adapter_config.json`` setting, a
    tensor of a module the model has no supported target for, a wrong shape, a rank that
    disagrees with ``r``, a missing ``lora_A``/``lora_B``, non-finite numbers, or an adapter
    larger than the cache that would hold it. ``module`` names the module and ``key`` the config
    key at fault, when there is one."""

    code = "invalid_adapter"

    def __init__(self, message: str, *, module: str | None = None, key: str | None = None) -> None:
        super().__init__(message)
        self.module = module
        self.key = key
