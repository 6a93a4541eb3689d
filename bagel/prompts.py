"""The two think-mode system prompts BAGEL was trained with.

Owns: their exact texts (taken from the golden fixture's ``cases.json`` → ``constants``, which
recorded the reference's values byte for byte, including the space before the newline). In
think mode the engine prefills one of them as the first text segment: the understanding one
before an answer, the generation one before an image.

Departures from the reference: none.
"""

VLM_THINK_SYSTEM_PROMPT = (
    "You should first think about the reasoning process in the mind and then provide the user "
    "with the answer. \nThe reasoning process is enclosed within <think> </think> tags, i.e. "
    "<think> reasoning process here </think> answer here"
)

GEN_THINK_SYSTEM_PROMPT = (
    "You should first think about the planning process in the mind and then generate the image. "
    "\nThe planning process is enclosed within <think> </think> tags, i.e. <think> planning "
    "process here </think> image here"
)


def think_system_prompt(task: str) -> str:
    """The system prompt a ``think`` request of ``task`` starts with."""
    return VLM_THINK_SYSTEM_PROMPT if task == "understand" else GEN_THINK_SYSTEM_PROMPT
