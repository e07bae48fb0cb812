"""Recycling a container for another episode: the server's side of the request, and the check of
the supervisor's report (its side: `sandbox_env/inside/recycle.py`).

The report comes on the authenticated channel, so only the supervisor can have written it; it
is still checked to the letter: exactly the keys of a report, `clean` a bool, and findings from
the supervisor's fixed vocabulary that agree with it. A clean report is the only way to a
recycle. Anything else, a failure of the channel, an anomaly or no answer in time included,
refuses the container, and the caller removes it.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from sandbox_env.inside.recycle import FINDINGS
from sandbox_env.inside.wire import Anomaly
from sandbox_env.kernels.docker.channel import Channel

logger = logging.getLogger(__name__)

RECYCLE_TIMEOUT_S = 10.0  # the supervisor answers in milliseconds; its own waits are 2 s and 5 s
REPORT_KEYS = frozenset({"op", "id", "clean", "findings"})


def unfit(*, closed: bool, reuses: int, allowed: int, busy: bool, tainted: bool) -> str | None:
    """Why a kernel may not even be asked to recycle: closed, its reuse budget (`allowed`) spent,
    a request still running, or its episode saw an anomaly (docs/docker.md lists them)."""
    if closed:
        return "closed"
    if reuses >= allowed:
        return "budget"
    if busy:
        return "busy"
    return "tainted" if tainted else None


async def make_slate(channel: Channel, container: str) -> str | None:
    """Ask the supervisor to make the next episode's slate and check it: None when it is clean,
    else why the container must go ("leftovers", "failed")."""
    try:
        async with asyncio.timeout(RECYCLE_TIMEOUT_S):
            reply = await channel.request({"op": "recycle"})
    except (Anomaly, TimeoutError, asyncio.IncompleteReadError, ConnectionError, OSError, ValueError) as exc:
        logger.warning("container %s: recycling failed (%r); removed", container[:12], exc)
        return "failed"
    why = report_refusal(reply)
    if why is not None:
        logger.info("container %s not recycled: %s %.300r", container[:12], why, reply.get("findings"))
    return why


def report_refusal(reply: dict[str, Any]) -> str | None:
    """None for a clean report; "leftovers" for a well-formed report of findings; "failed" for
    anything that is not a report."""
    if set(reply) != REPORT_KEYS or reply["op"] != "result" or type(reply["clean"]) is not bool:
        return "failed"
    findings = reply["findings"]
    if type(findings) is not list or not all(type(f) is str and f in FINDINGS for f in findings):
        return "failed"
    if reply["clean"] != (findings == []):
        return "failed"
    return None if reply["clean"] else "leftovers"
