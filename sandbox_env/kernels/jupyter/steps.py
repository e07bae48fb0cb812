"""What a kernel sends back for a request: a step's messages read to their end, its execute_reply,
how it ended (the verdict told in its output), and the namespace inspection's one expression.

Whatever the kernel answers, the server reads a bounded amount and never trusts its parsing."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import queue
import re
from collections.abc import Callable
from typing import Any

import zmq.asyncio
from jupyter_client.asynchronous import AsyncKernelClient

from sandbox_env.errors import KernelError
from sandbox_env.kernels.jupyter import relay as zmq_relay
from sandbox_env.kernels.jupyter.limits import Confinement
from sandbox_env.kernels.jupyter.process import DRAIN, RELAY_FRAMES, KernelProcess, disconnected, interrupt
from sandbox_env.kernels.output import KernelAnomaly, StepCollector, check_reply, died
from sandbox_env.models import ExecStatus

logger = logging.getLogger(__name__)

POLL_S = 0.2  # how often a silent step checks that the kernel process is alive
# One expression, evaluated through user_expressions: no extra request, no history entry.
INSPECT_EXPR = (
    "__import__('base64').b64encode(__import__('json').dumps([(k, type(v).__name__, "
    "__import__('reprlib').repr(v)) for k, v in list(get_ipython().user_ns.items()) if not k.startswith('_') "
    "and k not in get_ipython().user_ns_hidden and not isinstance(v, type(__import__('sys')))]).encode())"
)
# What the server accepts back: the repr of base64 text, checked by one regex before any parsing
# (the kernel's code may have replaced json or base64 to answer anything).
INSPECT_REPLY = re.compile(r"b'([A-Za-z0-9+/]*={0,2})'")
INSPECT_MAX = 1 << 20


def parse_variables(reply: dict[str, Any] | None, rows_max: int = 1000, chars: int = 1000) -> list[dict[str, str]]:
    """The rows of INSPECT_EXPR; whatever the kernel answered, a bounded list of strings."""
    try:
        text = reply["content"]["user_expressions"]["v"]["data"]["text/plain"]  # type: ignore[index]
        match = INSPECT_REPLY.fullmatch(text) if isinstance(text, str) and len(text) <= INSPECT_MAX else None
        rows = json.loads(base64.b64decode(match.group(1))) if match else []
        return [{"name": n[:chars], "type": t[:chars], "repr": r[:chars]} for n, t, r in rows[:rows_max]
                if isinstance(n, str) and isinstance(t, str) and isinstance(r, str)]
    except Exception:  # noqa: BLE001 - malformed, deep, huge: no variables
        return []


async def read_step(cur: KernelProcess, step: StepCollector, msg_id: str, deadline: float, grace_s: float,
                    current: Callable[[], bool]) -> ExecStatus | None:
    """Collect the step's iopub messages until it is idle, or the kernel exits, dies or breaks the
    protocol. At the deadline or the output limit: an interrupt, then `grace_s` for it to work.
    Returns why the step was stopped (None: it was not); `current`: `cur` is still the kernel."""
    loop = asyncio.get_running_loop()
    kc = cur.kc
    assert kc is not None
    status: ExecStatus | None = None
    grace_until: float | None = None
    while True:
        now = loop.time()
        if grace_until is None and (now >= deadline or step.over_limit):
            status = ExecStatus.OUTPUT_LIMIT if step.over_limit else ExecStatus.TIMEOUT
            if status is ExecStatus.OUTPUT_LIMIT:
                step.stop_capturing()
            grace_until = now + grace_s
            with contextlib.suppress(Exception):
                await interrupt(cur)
        elif grace_until is not None and now >= grace_until:
            break  # SIGINT ignored: kill
        end = deadline if grace_until is None else grace_until
        try:
            msg = await kc.get_iopub_msg(timeout=max(0.001, min(end - now, POLL_S)))
        except queue.Empty:
            if cur.exit_status() is not None or cur.relay_status() is not None or disconnected(kc):
                break
            continue
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if current() or (task is not None and task.cancelling()):
                raise
            break  # close() shut the sockets under us: not our caller's cancellation
        except zmq.ZMQError as exc:  # the socket itself: ours, not the kernel's doing
            if current():
                raise KernelError(f"lost the kernel's connection: {exc}") from exc
            break
        except Exception as exc:  # noqa: BLE001 - what the kernel sent does not parse
            step.anomaly = f"an unreadable message ({type(exc).__name__})"
            break
        await asyncio.sleep(0)  # a queue of ready messages never holds the event loop
        if step.add(msg, msg_id):
            break  # idle, exiting, or broken
    return status


async def final_exit_status(cur: KernelProcess, step: StepCollector) -> int | None:
    """The kernel process's exit status (None: alive). A dropped connection with a live process
    is an anomaly, once the process had a moment to finish dying (its sockets close first)."""
    oversize = f"a message over {RELAY_FRAMES} frames or the size limit, or slow to parse"
    exit_status, relay = cur.exit_status(), cur.relay_status()
    if exit_status is None and step.anomaly is None and relay == zmq_relay.OVERSIZE:
        step.anomaly = oversize
        return None
    if exit_status is not None or step.anomaly is not None or cur.kc is None or (
            relay is None and not disconnected(cur.kc)):
        return exit_status
    for _ in range(50):
        await asyncio.sleep(0.02)
        if (exit_status := cur.exit_status()) is not None:
            return exit_status
    relay = cur.relay_status()
    step.anomaly = (oversize if relay == zmq_relay.OVERSIZE else "a message over the size limit, or a dropped "
                    "connection" if relay in (None, zmq_relay.DROPPED) else f"its relay died (exit status {relay})")
    return None


async def read_reply(kc: AsyncKernelClient, msg_id: str, end: float) -> dict[str, Any] | None:
    """The execute_reply of `msg_id` (stale replies of interrupted steps are skipped); raises
    KernelAnomaly for a message that does not parse or does not fit."""
    loop = asyncio.get_running_loop()
    while (left := end - loop.time()) > 0:
        try:
            msg = await kc.get_shell_msg(timeout=left)
        except queue.Empty:
            return None
        except (asyncio.CancelledError, zmq.ZMQError):
            raise
        except Exception as exc:  # noqa: BLE001 - what the kernel sent does not parse
            raise KernelAnomaly(f"an unreadable reply ({type(exc).__name__})") from exc
        await asyncio.sleep(0)  # stale replies queued: one at a time
        if (reply := check_reply(msg, msg_id)) is not None:
            return reply
    return None


def verdict(step: StepCollector, status: ExecStatus | None, reply: dict[str, Any] | None, exit_status: int | None,
            conf: Confinement, oom0: int | None, *, lost: bool, replaced: bool,
            kernel_id: str) -> tuple[ExecStatus, int | None]:
    """The step's status and exit code; its stderr says how it ended when that was not its own doing
    (a child killed for memory, a `lost` kernel). `replaced`: the kernel was shut down meanwhile."""
    code: int | None = None
    if not lost:
        status = status or step.status_from(reply)
        if status in (ExecStatus.OK, ExecStatus.ERROR) and (conf.oom_kills() or 0) > (oom0 or 0):
            status = ExecStatus.OOM  # a child process hit the memory limit; the kernel survived
            step.out.write("stderr", "[sandbox-env] a process started by this step was killed: "
                           "out of memory.\n")
    elif replaced:
        status = status or ExecStatus.KILLED
        step.out.write("stderr", "[sandbox-env] the kernel was shut down during the step.\n")
    elif step.anomaly is not None:
        status = ExecStatus.KILLED
        logger.warning("kernel %s broke the protocol (%s); replaced", kernel_id, step.anomaly)
        step.out.write("stderr", f"[sandbox-env] the kernel broke the message protocol ({step.anomaly}); "
                       "it was killed and restarted with an empty namespace.\n")
    elif step.exited:  # os._exit(n), told by the kernel, which now waits to be killed
        status = status or step.status_from(None)
        step.out.write("stderr", f"[sandbox-env] the interpreter exited (os._exit({step.exit_code})); "
                       "it was restarted with an empty namespace.\n")
    elif status is None and exit_status is not None:
        oom = (conf.oom_kills() or 0) > (oom0 or 0)
        status, code = (ExecStatus.OOM, 137) if oom else died(exit_status)
        step.out.write("stderr", f"[sandbox-env] the interpreter {'died' if exit_status < 0 or oom else 'exited'}"
                       f" (exit status {exit_status}{', out of memory' if oom else ''}); it was restarted "
                       "with an empty namespace.\n")
    else:
        status = status or ExecStatus.KILLED
        step.out.write("stderr", "[sandbox-env] the interpreter did not stop on interrupt; it was killed "
                       "and restarted with an empty namespace.\n")
    return status, code


async def drain_iopub(kc: AsyncKernelClient) -> None:
    """iopub is nobody's between steps: drop its status messages, or the kernel's iopub (which
    waits rather than drop) would stall once its queue is full."""
    for _ in range(DRAIN):
        try:
            await kc.get_iopub_msg(timeout=0)
        except queue.Empty:
            break
        except (asyncio.CancelledError, zmq.ZMQError):
            raise
        except Exception:  # noqa: BLE001, S112 - unreadable: dropped all the same
            continue
        finally:
            await asyncio.sleep(0)  # one message at a time; at most DRAIN (the rest: next step)
