"""BAGEL as LangChain tools (``bagel_client.agents``) against the real service: the API, GPU
worker (tiny checkpoint) and reconciler as processes, driven by langchain-core's fake chat model
emitting tool calls, run by a minimal agent loop (model → each tool call → ``ToolMessage``s back).

Covered: the tools' schemas as an LLM gets them (every argument described); a fake agent opens a
session (``bagel_new_session``), draws a picture in it (``bagel_imagine``: a downloadable PNG
URL), asks about that picture by its URL in the same session (``bagel_describe`` with its
reasoning: the latest picture is not added to the context again) and once more outside the
session (the picture uploaded from its job); both turns are the session's, in order, in its
transcript. Bad calls come back as readable results, never exceptions: an unknown file id, a
blank prompt, a missing argument, a picture neither given nor in a session, a path that is not
there, a URL the tools did not make, an unknown session; a job that cannot finish within the
call's timeout is reported as timed out and canceled. ``langchain_core`` is imported by
``bagel_client.agents`` only. The README's agents example runs as written.
"""

from __future__ import annotations

import ast
import io
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from langchain_core.language_models.fake_chat_models import GenericFakeChatModel
from langchain_core.messages import AIMessage, BaseMessage, HumanMessage, ToolMessage
from langchain_core.tools import BaseTool
from langchain_core.utils.function_calling import convert_to_openai_tool
from PIL import Image

from bagel_client import Client, Job
from bagel_client.agents import BagelToolkit, toolkit
from tests.fixtures.worker import ROOT, Stack
from worker import tenants
from worker.dev.demo import product_image
from worker.models import Job as JobRow
from worker.models import JobStatus

SQLITE_ONLY = pytest.mark.parametrize("stack_base", ["sqlite"], indirect=True)
PX = 64
WAIT_S = 240.0
FAST = {"width": PX, "height": PX, "imagine_params": {"num_timesteps": 2, "seed": 3},
        "describe_params": {"max_new_tokens": 8}, "timeout_s": WAIT_S, "poll_s": 0.05}


def _key(stack: Stack) -> str:
    with stack.session() as s:
        tenant = tenants.create_tenant(s, "agents")
        return tenants.create_api_key(s, tenant.id)[1]


def _call(name: str, args: dict, n: int) -> AIMessage:
    return AIMessage(content="", tool_calls=[{"name": name, "args": args, "id": f"call_{n}", "type": "tool_call"}])


def run_agent(model: GenericFakeChatModel, tools: list[BaseTool], messages: list[BaseMessage]) -> list[BaseMessage]:
    """The minimal agent loop: ask the model, run each tool call it emits, feed the results back,
    until it answers without tool calls."""
    by_name = {tool.name: tool for tool in tools}
    while True:
        reply = model.invoke(messages)
        messages.append(reply)
        if not reply.tool_calls:
            return messages
        for call in reply.tool_calls:
            messages.append(by_name[call["name"]].invoke(call))


def _last_result(messages: list[BaseMessage]) -> dict:
    message = messages[-1]
    assert isinstance(message, ToolMessage) and message.status == "success", message
    return json.loads(message.content)


def _script(messages: list[BaseMessage]) -> Iterator[AIMessage]:
    """What the fake model says, one reply per call; later replies use the tool results so far,
    as a real model would."""
    yield _call("bagel_new_session", {"system_prompt": "You draw Mira, a small red fox in a green scarf."}, 1)
    session = _last_result(messages)["session"]
    yield _call("bagel_imagine", {"prompt": "Mira reading a map in a snowy forest", "session": session}, 2)
    url = _last_result(messages)["image_url"]
    yield _call("bagel_describe", {"question": "What is Mira holding?", "image": url, "session": session,
                                   "think": True}, 3)
    yield _call("bagel_describe", {"question": "What colour is the scarf?", "image": url}, 4)
    yield AIMessage(content="Mira is reading a map.")


def test_the_tools_tell_an_llm_what_each_argument_means() -> None:
    with Client("http://127.0.0.1:9", "bj_test") as client:
        schemas = {t["function"]["name"]: t["function"] for t in map(convert_to_openai_tool, toolkit(client))}
    assert sorted(schemas) == ["bagel_describe", "bagel_imagine", "bagel_new_session"]
    for name, schema in schemas.items():
        assert schema["description"], name
        for arg, spec in schema["parameters"]["properties"].items():
            assert spec.get("description"), f"{name}.{arg}"
    assert schemas["bagel_describe"]["parameters"]["required"] == ["question"]
    assert schemas["bagel_imagine"]["parameters"]["required"] == ["prompt"]


def test_a_fake_agent_imagines_and_describes_in_one_session(stack: Stack) -> None:
    for role in ("api", "gpu", "reconciler"):
        stack.start(role)
    messages: list[BaseMessage] = [HumanMessage("Draw Mira reading a map, then tell me what she holds.")]
    model = GenericFakeChatModel(messages=_script(messages))
    with Client(stack.api_url(), _key(stack)) as client:
        kit = BagelToolkit(client, **FAST)
        run_agent(model, kit.get_tools(), messages)
        results = [m for m in messages if isinstance(m, ToolMessage)]
        assert [m.status for m in results] == ["success"] * 4, [m.content for m in results]
        opened, made, seen, outside = (json.loads(m.content) for m in results)
        jobs: list[Job] = [m.artifact for m in results[1:]]
        png = httpx.get(made["image_url"], timeout=30).raise_for_status().content
        session = client.get_session(opened["session"])
    assert kit.session_id is None  # the toolkit's own session was never needed

    assert made["session"] == seen["session"] == opened["session"] and outside["session"] is None
    assert (made["turn"], seen["turn"]) == (0, 1) and made["size"] == f"{PX}x{PX}"
    picture = Image.open(io.BytesIO(png))
    assert picture.format == "PNG" and picture.size == (PX, PX)
    assert isinstance(seen["answer"], str) and isinstance(seen["think"], str) and "think" not in outside
    assert isinstance(outside["answer"], str)
    assert [(j.task, j.session_id, j.turn_index) for j in jobs] == [
        ("generate", session.id, 0), ("understand", session.id, 1), ("understand", None, None)]
    assert jobs[1].input_file_ids == []  # the session's latest picture is already in its context
    assert len(jobs[2].input_file_ids) == 1  # outside it the picture is uploaded from its job
    assert messages[-1].content == "Mira is reading a map."

    assert [(t.index, t.job_id, t.task, t.status) for t in session.turns] == [
        (0, jobs[0].id, "generate", "succeeded"), (1, jobs[1].id, "understand", "succeeded")]
    assert [(i.turn, i.role, i.kind) for i in session.transcript] == [
        (None, "system", "text"), (0, "user", "text"), (0, "assistant", "image"), (1, "user", "text"),
        (1, "assistant", "text")]
    assert session.transcript[1].text == "Mira reading a map in a snowy forest"
    assert session.transcript[2].url is not None and session.transcript[2].url.split("?")[0] == \
        made["image_url"].split("?")[0]
    assert session.transcript[4].text == seen["answer"]


@SQLITE_ONLY
def test_bad_calls_and_timeouts_come_back_as_readable_results(stack: Stack, tmp_path: Path) -> None:
    stack.start("api")  # no GPU worker: a job stays queued past any timeout
    with Client(stack.api_url(), _key(stack)) as client:
        kit = BagelToolkit(client, session=True, **{**FAST, "timeout_s": 0.3})
        tools = {tool.name: tool for tool in kit.get_tools()}
        calls = {
            "unknown_file": ("bagel_describe", {"question": "What is it?", "image": "no-such-file"}),
            "blank_prompt": ("bagel_imagine", {"prompt": "   "}),
            "no_question": ("bagel_describe", {"image": "no-such-file"}),
            "no_file_there": ("bagel_describe", {"question": "What is it?", "image": str(tmp_path / "gone.png")}),
            "foreign_url": ("bagel_imagine", {"prompt": "bluer", "image": "https://example.com/cat.png?sig=1"}),
            "unknown_session": ("bagel_imagine", {"prompt": "a fox", "session": "no-such-session"}),
            "timeout": ("bagel_imagine", {"prompt": "a fox in the snow"}),
        }
        replies = {case: tools[name].invoke({"name": name, "args": args, "id": case, "type": "tool_call"})
                   for case, (name, args) in calls.items()}
        one_off = BagelToolkit(client, **FAST).get_tools()[0].invoke({"question": "What is it?"})
        session = client.get_session(kit.session_id)
        timed_out = client.get_job(session.turns[0].job_id)

    assert all(isinstance(r, ToolMessage) and r.status == "error" for r in replies.values()), replies
    text = {case: r.content for case, r in replies.items()}
    assert text["unknown_file"] == ("bagel_describe failed: HTTP 422 unknown_file (field input_file_ids[0]): "
                                    "input_file_ids[0]: file 'no-such-file' not found")
    assert text["blank_prompt"].startswith("bagel_imagine failed: HTTP 422 ") and "(field prompt)" in text[
        "blank_prompt"]
    assert text["no_question"] == "bagel_describe failed: invalid arguments: question: Field required"
    assert text["no_file_there"] == (f"bagel_describe failed: image: no file at {str(tmp_path / 'gone.png')!r} on "
                                     "this machine (give a file id, a local path or an image_url bagel_imagine "
                                     "returned)")
    assert text["foreign_url"].startswith("bagel_imagine failed: image: https://example.com/cat.png is not a "
                                          "picture these tools made")
    assert text["unknown_session"] == ("bagel_imagine failed: HTTP 404 not_found (field session_id): session_id: "
                                       "session 'no-such-session' not found")
    assert text["timeout"].startswith(f"bagel_imagine timed out: job {timed_out.id}: not finished within 0.3 s")
    assert "it was canceled" in text["timeout"] and "larger timeout_s" in text["timeout"]
    assert one_off.startswith("bagel_describe failed: image: give a picture to describe")
    assert "Traceback" not in "".join(text.values())

    assert (timed_out.status, timed_out.session_id) == ("canceled", kit.session_id)
    assert [t.task for t in session.turns] == ["generate"]  # the refused calls stored nothing


def test_only_the_agents_module_imports_langchain() -> None:
    importers = []
    for path in sorted((ROOT / "bagel_client").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            if any(n.split(".")[0] in ("langchain_core", "langchain", "pydantic") for n in names):
                importers.append(path.name)
    assert sorted(set(importers)) == ["agents.py"]
    script = "import sys, bagel_client, bagel_client.cli; print(sorted(m for m in sys.modules if 'langchain' in m))"
    run = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, check=True)
    assert run.stdout.strip() == "[]"


# README "Agents: BAGEL as LangChain tools", run as written.
AGENTS_EXAMPLE = '''\
import json

from bagel_client import Client
from bagel_client.agents import BagelToolkit

with Client() as client:  # BAGEL_API_URL and BAGEL_API_KEY from the environment
    kit = BagelToolkit(client, session=True, timeout_s=300)  # one visual context for the agent
    tools = {tool.name: tool for tool in kit.get_tools()}
    made = json.loads(tools["bagel_imagine"].invoke({"prompt": "the bag on a beach at sunset", "image": "bag.png"}))
    print(made["image_url"], made["size"])
    seen = json.loads(tools["bagel_describe"].invoke({"question": "What is on the beach?"}))  # the latest picture
    print(seen["answer"])
    print(tools["bagel_describe"].invoke({"question": "What is it?", "image": "no-such-file"}))  # an error, as text
'''


@SQLITE_ONLY
def test_the_readme_agents_example_runs_as_written(stack: Stack, tmp_path: Path) -> None:
    for role in ("api", "gpu", "reconciler"):
        stack.start(role)
    (tmp_path / "bag.png").write_bytes(product_image(PX))
    env = dict(stack.env, BAGEL_API_URL=stack.api_url(), BAGEL_API_KEY=_key(stack))
    assert f"```python\n{AGENTS_EXAMPLE}```" in (ROOT / "README.md").read_text()  # the README's, as written
    run = subprocess.run([sys.executable, "-c", AGENTS_EXAMPLE], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=WAIT_S, check=False)
    assert run.returncode == 0, run.stderr
    url_line, rest = run.stdout.split("\n", 1)
    answer, error = rest.removesuffix("\n").rsplit("\n", 1)  # the answer may hold new lines
    url, size = url_line.split()
    assert url.startswith(stack.api_url()) and size == f"{PX}x{PX}"
    assert error.startswith("bagel_describe failed: HTTP 422 unknown_file (field input_file_ids[0])")
    with stack.session() as s:
        rows = sorted(s.query(JobRow).all(), key=lambda j: j.turn_index)
    assert [(j.task, j.turn_index, JobStatus(j.status).value) for j in rows] == [("edit", 0, "succeeded"),
                                                                      ("understand", 1, "succeeded")]
    assert rows[1].output_text == answer
