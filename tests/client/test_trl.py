"""TRL hooks driven the way TRL drives them: a no-argument class, sync tool calls, get_reward."""

from __future__ import annotations

import asyncio
import inspect
import threading

import pytest

from sandbox_env.client.trl import AsyncSandboxToolEnv, SandboxToolEnv, async_code_reward, code_reward, extract_code

TASK = {
    "id": "add-two",
    "prompt": "Write add(a, b) returning the sum.",
    "tests": {"kind": "asserts", "asserts": ["assert add(1, 2) == 3", "assert add(-1, 1) == 0"]},
}


def make_factory(url: str) -> type[SandboxToolEnv]:
    class Env(SandboxToolEnv):
        base_url = url

    return Env


def test_environment_factory_tools_and_reward(live_server) -> None:
    env = make_factory(live_server.url)()  # TRL calls it with no arguments
    try:
        prompt = env.reset(task=TASK, prompt="ignored dataset column")
        # TRL appends it to the row's user message as is: it starts with a paragraph break.
        assert prompt is not None and prompt.startswith("\n\n") and "add(a, b)" in prompt
        assert env.run_python("def add(a, b):\n    return a - b\nprint(add(5, 3))").strip() == "2"
        assert "[error]" in env.run_python("add(1)")  # the outcome reaches the model as text
        assert env.get_reward() == 0.0
        assert env.submit("def add(a, b):\n    return a + b") == "2/2 tests passed"
        assert env.get_reward() == 1.0

        env.reset(task=TASK)
        env.submit("def add(a, b):\n    return a * b")
        assert env.get_reward() == 0.0
        assert env.reset(prompt="no task") is None  # nothing to append to the prompt
    finally:
        env.close()


def trl_tools(cls: type) -> list[str]:
    """TRL 1.16's rule (GRPOTrainer and its async worker): public functions of the class but
    `reset` and `get_reward`."""
    return [name for name, _ in inspect.getmembers(cls, predicate=inspect.isfunction)
            if name not in ("reset", "get_reward") and not name.startswith("_")]


@pytest.mark.parametrize("cls", [SandboxToolEnv, AsyncSandboxToolEnv])
def test_trl_sees_exactly_the_two_documented_tools(cls: type) -> None:
    assert trl_tools(cls) == ["run_python", "submit"]  # `close` is no tool for the model
    for name in trl_tools(cls):
        doc = getattr(cls, name).__doc__
        assert doc and "Args:" in doc and "code:" in doc
    is_async = cls is AsyncSandboxToolEnv
    assert all(inspect.iscoroutinefunction(getattr(cls, n)) == is_async for n in trl_tools(cls))
    assert not inspect.iscoroutinefunction(cls.reset)  # TRL calls reset without awaiting


def test_async_tools_run_on_the_callers_loop_concurrently(live_server) -> None:
    """As TRL does: reset from the training thread, tools awaited on its daemon event loop."""
    class Env(AsyncSandboxToolEnv):
        base_url = live_server.url

    envs = [Env(), Env()]
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        assert all(env.reset(task=TASK).startswith("\n\n") for env in envs)

        async def rollout(env: AsyncSandboxToolEnv, n: int) -> tuple[str, str]:
            out = await env.run_python(f"print({n} * 7)")
            return out, await env.submit("def add(a, b):\n    return a + b")

        async def both() -> list[tuple[str, str]]:
            return list(await asyncio.gather(*(rollout(e, n) for n, e in enumerate(envs, 1))))

        results = asyncio.run_coroutine_threadsafe(both(), loop).result(timeout=120)
        assert results == [("7\n", "2/2 tests passed"), ("14\n", "2/2 tests passed")]
        assert [e.get_reward() for e in envs] == [1.0, 1.0]
        rewards = asyncio.run_coroutine_threadsafe(async_code_reward(
            ["def add(a, b):\n    return a + b", "def add(a, b):\n    return 0"],
            task=[TASK, TASK], base_url=live_server.url), loop).result(timeout=120)
        assert rewards == [1.0, 0.0]
    finally:
        for env in envs:
            env.close()
            env.close()  # twice is harmless
        loop.call_soon_threadsafe(loop.stop)
        thread.join()


def test_code_reward_grades_each_completion(live_server) -> None:
    completions = [
        [{"role": "assistant", "content": "Sure:\n```python\ndef add(a, b):\n    return a + b\n```"}],
        [{"role": "assistant", "content": "def add(a, b):\n    return 0"}],
    ]
    rewards = code_reward(completions, task=[TASK, TASK], base_url=live_server.url)
    assert rewards == [1.0, 0.0]
    with pytest.raises(ValueError, match="task_id"):
        code_reward(completions, base_url=live_server.url)


@pytest.mark.parametrize(("text", "code"), [
    ("```python\nx = 1\n```", "x = 1\n"),
    ("no fences", "no fences"),
    ("a\n```\nfirst\n```\nthen\n```py\nsecond\n```", "second\n"),
])
def test_extract_code(text: str, code: str) -> None:
    assert extract_code(text) == code


def test_hooks_take_the_token_from_the_class_or_the_environment(live_server) -> None:
    from sandbox_env.errors import AuthError

    class Wrong(SandboxToolEnv):
        base_url = live_server.url
        token = "not-the-token-at-all"

    env = Wrong()
    try:
        with pytest.raises(AuthError):
            env.reset()
    finally:
        env.close()
    rewards = code_reward(["def add(a, b):\n    return a + b"], task=[TASK], base_url=live_server.url,
                          token=live_server.token)
    assert rewards == [1.0]
    with pytest.raises(AuthError):
        code_reward(["x"], task=[TASK], base_url=live_server.url, token="not-the-token-at-all")
