"""The farm: replicas of this server behind one gateway (compose.yaml, docs/scaling.md).

Replicas find each other by DNS: `farm_peers` names every replica (compose: the service's name;
Swarm: a dnsrr service's). Every episode and session id starts with its replica's name
(`<replica>.<uuid>`), so whichever replica a request for `/episodes/{id}` reaches, it knows the
owner and forwards the request there; an id a client chose names no replica, and is asked of
every replica. `/episodes` gathers every replica's list. A request one replica sends another
carries `FORWARDED` and the caller's own credentials: the owner checks them itself (tenancy
included), and never forwards again.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import AsyncIterator
from urllib.parse import quote

import httpx
from fastapi import Request
from fastapi.responses import Response

from sandbox_env.settings import Settings

log = logging.getLogger(__name__)

FORWARDED = "x-sandbox-env-farm"  # value: the sending replica's name
PASSED = ("authorization", "cookie", "accept", "content-type")  # what a forwarded request keeps of the caller's
KEPT = ("content-type", "retry-after", "content-disposition", "x-content-type-options", "cache-control", FORWARDED)
PEER_TIMEOUT_S = 5.0  # an inspection waits up to 3 s for a busy kernel, plus the hop
DNS_TIMEOUT_S = 2.0


class AmbiguousEpisode(Exception):
    def __init__(self, count: int) -> None:
        super().__init__(f"{count} replicas hold this episode_id")
        self.count = count


class Farm:
    """This replica's view of the farm: its own name, its peers' addresses and names."""

    def __init__(self, settings: Settings) -> None:
        name = settings.replica_name()
        assert name is not None and settings.farm_peers
        self.name = name
        self.service = settings.farm_peers
        self.port = settings.port
        self.names: dict[str, str] = {}  # peer replica name -> address ("ip:port"), learnt from their replies
        self._client = httpx.AsyncClient(timeout=PEER_TIMEOUT_S, trust_env=False)

    async def close(self) -> None:
        await self._client.aclose()

    def names_by_address(self) -> dict[str, str]:
        return {address: name for name, address in self.names.items()}

    @staticmethod
    def forwarded(request: Request) -> bool:
        return FORWARDED in request.headers

    async def peers(self) -> list[str]:
        """Every other replica's address, from DNS now (replicas come and go)."""
        loop = asyncio.get_running_loop()
        try:
            found = await asyncio.wait_for(loop.getaddrinfo(self.service, self.port, type=socket.SOCK_STREAM),
                                           DNS_TIMEOUT_S)
            mine = await asyncio.wait_for(loop.getaddrinfo(socket.gethostname(), self.port, type=socket.SOCK_STREAM),
                                          DNS_TIMEOUT_S)
        except (OSError, TimeoutError) as exc:
            log.warning("farm: cannot resolve %s: %s", self.service, exc)
            return []
        own = {str(info[4][0]) for info in mine}
        addresses = sorted({str(info[4][0]) for info in found} - own)
        return [f"[{ip}]:{self.port}" if ":" in ip else f"{ip}:{self.port}" for ip in addresses]

    def _headers(self, request: Request) -> dict[str, str]:
        """The caller's credentials and this replica's name (which stops the peer forwarding again)."""
        headers = {k: v for k, v in request.headers.items() if k in PASSED}
        headers[FORWARDED] = self.name
        return headers

    async def send(self, request: Request, address: str, method: str, path: str,
                   body: bytes | None = None) -> httpx.Response | None:
        """`method path` (with the request's query, and `body`) on a peer, with the caller's
        credentials; None when the peer cannot be reached."""
        try:
            reply = await self._client.request(method, f"http://{address}{path}", params=request.query_params,
                                               headers=self._headers(request), content=body)
        except httpx.HTTPError as exc:
            log.info("farm: %s %s on %s failed: %s", method, path, address, exc)
            return None
        name = reply.headers.get(FORWARDED)
        if name:
            self.names[name] = address
        return reply

    async def gather(self, request: Request, path: str) -> list[tuple[str, httpx.Response | None]]:
        """GET `path` on every peer at once: (address, reply or None)."""
        peers = await self.peers()
        replies = await asyncio.gather(*(self.send(request, address, "GET", path) for address in peers))
        return list(zip(peers, replies))

    async def route(self, request: Request, episode_id: str) -> Response | None:
        """The owner's answer to this request about `episode_id`, which this replica does not hold;
        None to answer here (not found): a forwarded request, an id of this replica, or no peer has it."""
        if self.forwarded(request):
            return None
        owner = episode_id.split(".", 1)[0] if "." in episode_id else None
        if owner == self.name:
            return None
        path = raw_path(request)
        if owner is not None and (address := await self.address_of(request, owner)) is not None:
            reply = await self.send(request, address, request.method, path)
            return _relay(reply) if reply is not None else None
        # A client's own episode_id: ask every replica, then act on the one that has it.
        try:
            holder = await self.holder(request, episode_id)
        except AmbiguousEpisode as exc:
            return Response(f'{{"detail": {{"code": "ambiguous_episode_id", "message": "{exc.count} replicas hold '
                            'an episode with this episode_id: name one by its session_id (GET /episodes lists them)"}}',
                            status_code=409, media_type="application/json")
        if holder is None:
            return None
        reply = await self.send(request, holder, request.method, path)
        return _relay(reply) if reply is not None else None

    async def holder(self, request: Request, episode_id: str) -> str | None:
        """The address of the one peer holding a client's own `episode_id` (live or ended), None if
        none does; AmbiguousEpisode if several do."""
        probe = f"/episodes/{quote(episode_id, safe='')}"
        holders = [address for address, reply in await self.gather(request, probe)
                   if reply is not None and reply.status_code in (200, 409)]
        if len(holders) > 1:
            raise AmbiguousEpisode(len(holders))
        return holders[0] if holders else None


    async def stream(self, request: Request, episode_id: str) -> tuple[AsyncIterator[bytes], int, str] | None:
        """The event stream of `episode_id` from the replica its id names (a client's own id: the
        one replica holding it), relayed as it comes: (body, status, media type); None to answer here."""
        owner = episode_id.split(".", 1)[0] if "." in episode_id else None
        if self.forwarded(request) or owner == self.name:
            return None
        try:
            address = await self.address_of(request, owner) if owner is not None else await self.holder(request, episode_id)
        except AmbiguousEpisode:
            return None  # answered here: its own, or not found (a session_id names one)
        if address is None:
            return None
        outgoing = self._client.build_request("GET", f"http://{address}{raw_path(request)}", params=request.query_params,
                                              headers=self._headers(request), timeout=httpx.Timeout(PEER_TIMEOUT_S, read=None))
        try:
            reply = await self._client.send(outgoing, stream=True)
        except httpx.HTTPError as exc:
            log.info("farm: the event stream on %s failed: %s", address, exc)
            return None

        async def body() -> AsyncIterator[bytes]:
            try:
                async for chunk in reply.aiter_raw():
                    yield chunk
            except httpx.HTTPError:
                return  # the owner went away: the stream ends, the page reconnects
            finally:
                await reply.aclose()

        return body(), reply.status_code, reply.headers.get("content-type", "text/event-stream")

    async def address_of(self, request: Request, replica: str) -> str | None:
        """A peer's address by its name; the names of new replicas are learnt by asking them all."""
        if replica not in self.names:
            await self.gather(request, "/farm/replica")
        return self.names.get(replica)

    async def to_owner(self, request: Request, session_id: str, body: bytes) -> Response | None:
        """An MCP call on another replica's session (`<replica>.<hex>`, made by the server), sent
        there with its body; None to answer here."""
        owner = session_id.split(".", 1)[0] if "." in session_id else None
        if self.forwarded(request) or owner is None or owner == self.name:
            return None
        address = await self.address_of(request, owner)
        if address is None:
            return None
        reply = await self.send(request, address, request.method, raw_path(request), body)
        return _relay(reply) if reply is not None else None


def raw_path(request: Request) -> str:
    """The path as the client sent it, still percent-encoded: decoded, an id with `%2e%2e` or
    `%23` would name another path on the peer."""
    raw = request.scope.get("raw_path")
    return raw.decode("latin-1").split("?", 1)[0] if raw else quote(request.url.path)


def _relay(reply: httpx.Response) -> Response:
    kept = {k: v for k, v in reply.headers.items() if k in KEPT}
    return Response(reply.content, status_code=reply.status_code, headers=kept)


def farm_of(request: Request) -> Farm | None:
    farm: Farm | None = getattr(request.app.state, "farm", None)
    return farm
