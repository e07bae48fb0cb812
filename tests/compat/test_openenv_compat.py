"""Our server driven by the real `openenv` package (0.10.0), as OpenEnv and TRL users drive it."""

from __future__ import annotations

import asyncio
from typing import Any, ClassVar

import pytest

pytest.importorskip("openenv")
from openenv.core.client_types import StepResult  # noqa: E402
from openenv.core.env_client import EnvClient  # noqa: E402
from openenv.core.env_server.types import Action, Observation, State  # noqa: E402
from openenv.core.generic_client import GenericEnvClient  # noqa: E402


# The typed client exactly as OpenEnv's coding_env ships it: its observation model forbids
# unknown keys, so any extra key in our observation dict would make parsing fail.
class CodingAction(Action):
    code: str


class CodingObservation(Observation):
    stdout: str = ""
    stderr: str = ""
    exit_code: int = 0


class CodingState(State):
    last_exit_code: int = 0


class CodingEnv(EnvClient[CodingAction, CodingObservation, CodingState]):
    payloads: ClassVar[list[dict[str, Any]]] = []  # every observation payload parsed, for the test to check

    def _step_payload(self, action: CodingAction) -> dict[str, Any]:
        return {"code": action.code}

    def _parse_result(self, payload: dict[str, Any]) -> StepResult[CodingObservation]:
        self.payloads.append(payload)
        obs = CodingObservation(**payload["observation"])
        return StepResult(observation=obs, reward=payload.get("reward"), done=bool(payload.get("done")))

    def _parse_state(self, payload: dict[str, Any]) -> CodingState:
        return CodingState(episode_id=payload.get("episode_id"), step_count=payload.get("step_count", 0),
                           last_exit_code=payload.get("last_exit_code", 0))


async def test_generic_client_async(live_server) -> None:
    async with GenericEnvClient(base_url=live_server.url, headers=live_server.headers) as env:
        reset = await env.reset(seed=1)
        await env.step({"code": "x = 41"})
        result = await env.step({"code": "print(x + 1)"})
        state = await env.state()
    assert reset.done is False
    assert result.observation["stdout"] == "42\n"
    assert result.observation["exit_code"] == 0
    assert state["step_count"] == 2 and state["episode_id"]


def test_generic_client_sync(live_server) -> None:
    with GenericEnvClient(base_url=live_server.url, headers=live_server.headers).sync() as env:
        env.reset()
        env.step({"code": "import math"})
        result = env.step({"code": "print(math.factorial(5))"})
    assert result.observation["stdout"] == "120\n"


def test_typed_coding_client_parses_our_observations(live_server) -> None:
    CodingEnv.payloads.clear()
    with CodingEnv(base_url=live_server.url, headers=live_server.headers).sync() as env:
        env.reset()
        ok = env.step(CodingAction(code="print('typed')"))
        failed = env.step(CodingAction(code="raise KeyError('k')"))
        state = env.state()
    assert len(CodingEnv.payloads) == 3
    for payload in CodingEnv.payloads:
        assert set(payload["observation"]) <= {"stdout", "stderr", "exit_code", "metadata"}
    assert set(CodingEnv.payloads[1]["observation"]) == {"stdout", "stderr", "exit_code", "metadata"}
    assert ok.observation.stdout == "typed\n"
    assert failed.observation.exit_code != 0 and "KeyError" in failed.observation.stderr
    assert state.step_count == 2 and state.last_exit_code == failed.observation.exit_code


async def test_two_concurrent_sessions_cannot_see_each_other(live_server) -> None:
    async def session(value: str) -> tuple[str, str]:
        async with GenericEnvClient(base_url=live_server.url, headers=live_server.headers) as env:
            await env.reset()
            await env.step({"code": f"shared_name = {value!r}"})
            own = await env.step({"code": "print(shared_name)"})
            return own.observation["stdout"], str((await env.state())["episode_id"])

    (out_a, id_a), (out_b, id_b) = await asyncio.gather(session("a"), session("b"))
    assert (out_a, out_b) == ("a\n", "b\n")
    assert id_a != id_b

    async with GenericEnvClient(base_url=live_server.url, headers=live_server.headers) as fresh:
        await fresh.reset()
        result = await fresh.step({"code": "print(shared_name)"})
    assert result.observation["exit_code"] != 0 and "NameError" in result.observation["stderr"]


def test_autoenv_discovers_and_returns_our_client(live_server) -> None:
    from openenv.auto import AutoEnv
    from openenv.auto._discovery import get_discovery

    import sandbox_env

    get_discovery().clear_cache()  # discovery results are cached across runs
    info = get_discovery().get_environment_by_name("sandbox")
    assert info is not None and info.package_name == "openenv-sandbox-env"
    assert info.get_action_class() is sandbox_env.CodeAction
    assert info.get_observation_class() is sandbox_env.CodeObservation

    env = AutoEnv.from_env("sandbox", base_url=live_server.url)
    assert isinstance(env, sandbox_env.SandboxEnv)
    with env.sync() as client:
        client.reset()
        assert client.step("print('auto')").observation.stdout == "auto\n"
    # openenv >= 0.4 style, as TRL's environment_factory examples write it: no await, no .sync()
    plain = AutoEnv.from_env("sandbox", base_url=live_server.url)
    plain.reset()
    assert plain.step("print('plain')").observation.stdout == "plain\n"
    plain.close()


def test_autoenv_does_not_shadow_openenv_coding_key() -> None:
    from openenv.auto._discovery import get_discovery

    get_discovery().clear_cache()
    environments = get_discovery().discover(use_cache=False)
    assert "sandbox" in environments
    assert environments.get("coding") is None or environments["coding"].package_name != "openenv-sandbox-env"


async def test_openenv_clients_send_the_token_through_headers(live_server) -> None:
    """Auth is on by default: OpenEnv's clients get in with `headers=`, and without them they
    are refused at the handshake (the server never opens an episode for them)."""
    with pytest.raises(ConnectionError, match="HTTP 401"):
        async with GenericEnvClient(base_url=live_server.url) as anonymous:
            await anonymous.reset()
    with pytest.raises(ConnectionError, match="HTTP 401"):
        async with GenericEnvClient(base_url=live_server.url,
                                    headers={"Authorization": "Bearer not-the-token-at-all"}) as wrong:
            await wrong.reset()
    async with GenericEnvClient(base_url=live_server.url, headers=live_server.headers) as env:
        await env.reset()
        assert (await env.step({"code": "print('in')"})).observation["stdout"] == "in\n"
    with CodingEnv(base_url=live_server.url, headers=live_server.headers).sync() as typed:
        typed.reset()
        assert typed.step(CodingAction(code="print(5)")).observation.stdout == "5\n"
    # AutoEnv passes its kwargs to our client: an explicit token works as well as SANDBOX_ENV_TOKEN
    from openenv.auto import AutoEnv

    env = AutoEnv.from_env("sandbox", base_url=live_server.url, token=live_server.token)
    with env.sync() as client:
        client.reset()
        assert client.step("print('auto')").observation.stdout == "auto\n"
