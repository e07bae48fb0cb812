"""OpenEnv's reference `coding_env` server, on loopback, with room for several sessions: the baseline
of `bench_reference.py`. Not part of sandbox-env, and not run by its Python: it runs under the
separate virtualenv that has OpenEnv and `coding_env` installed (see `bench_reference.py`).

    /work/ref/venv/bin/python benchmarks/reference_server.py --port 8100 [--max-sessions 16]

It serves OpenEnv's own `PythonCodeActEnv` (smolagents' `LocalPythonExecutor`, in the server
process) through OpenEnv's own `create_app`, exactly as `coding_env.server.app` does, with one
difference: the stock app allows one session (`max_concurrent_envs` defaults to 1, and the env
class does not declare `SUPPORTS_CONCURRENT_SESSIONS`), so the memory per extra open session could
not be measured. Each session already has its own environment object and executor, so the
declaration changes nothing else. Nothing of OpenEnv's code is copied here.
"""

from __future__ import annotations

import argparse

import uvicorn
from coding_env.models import CodeAction, CodeObservation
from coding_env.server.python_codeact_env import PythonCodeActEnv
from openenv.core.env_server import create_app


class ConcurrentCodeActEnv(PythonCodeActEnv):
    SUPPORTS_CONCURRENT_SESSIONS = True


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--max-sessions", type=int, default=16)
    parser.add_argument("--log-level", default="warning")
    args = parser.parse_args()
    app = create_app(ConcurrentCodeActEnv, CodeAction, CodeObservation, env_name="coding_env",
                     max_concurrent_envs=args.max_sessions)
    # Loopback only: this server runs model code in its own process, unisolated.
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level=args.log_level)


if __name__ == "__main__":
    main()
