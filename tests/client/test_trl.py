"""TRL hooks driven the way TRL drives them: a no-argument class, sync tool calls, get_reward."""

from __future__ import annotations

import pytest

from sandbox_env.client.trl import SandboxToolEnv, code_reward, extract_code

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
        assert prompt is not None and "add(a, b)" in prompt
        assert env.run_python("def add(a, b):\n    return a - b\nprint(add(5, 3))").strip() == "2"
        assert "[error]" in env.run_python("add(1)")  # the outcome reaches the model as text
        assert env.get_reward() == 0.0
        assert env.submit("def add(a, b):\n    return a + b") == "2/2 tests passed"
        assert env.get_reward() == 1.0

        env.reset(task=TASK)
        env.submit("def add(a, b):\n    return a * b")
        assert env.get_reward() == 0.0
    finally:
        env.close()


def test_tools_have_documented_arguments_for_function_calling() -> None:
    for name in ("run_python", "submit"):
        doc = getattr(SandboxToolEnv, name).__doc__
        assert doc and "Args:" in doc and "code:" in doc


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
