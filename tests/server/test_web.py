"""The inspection API and page: JSON routes, and the page rendered by real headless Chromium."""

from __future__ import annotations

import subprocess
import tempfile

import httpx
from browser import browser

from sandbox_env import SandboxEnv

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def rendered_dom(chromium: str, url: str) -> str:
    """The page's DOM after its script ran (virtual time lets the fetches complete)."""
    with tempfile.TemporaryDirectory(ignore_cleanup_errors=True) as profile:  # a helper may outlive chromium
        out = subprocess.run([chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}",
                              "--virtual-time-budget=5000", "--dump-dom", url],
                             capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


async def test_inspection_api_lists_variables_history_and_closes(live_server) -> None:
    async with SandboxEnv(live_server.url) as env:
        await env.reset(episode_id="inspect-api")
        await env.step("import math\nradii = [1, 2, 3]\ndef area(r):\n    return math.pi * r * r")
        await env.step("area(2)")
        async with httpx.AsyncClient(base_url=live_server.url, headers=live_server.headers) as http:
            listing = (await http.get("/episodes")).json()
            assert "inspect-api" in [e["episode_id"] for e in listing["episodes"]]
            detail = (await http.get("/episodes/inspect-api")).json()
            names = {v["name"]: v for v in detail["kernel"]["variables"]}
            assert names["radii"]["type"] == "list" and "area" in names and "math" not in names
            assert [h["code"] for h in detail["history"]][0].startswith("import math")
            assert detail["summary"]["step_count"] == 2
            assert (await http.get("/episodes/nope")).status_code == 404
            assert (await http.delete("/episodes/inspect-api")).status_code == 200
            assert (await http.get("/episodes/inspect-api")).status_code == 404


async def test_episode_page_renders_in_chromium_without_injecting_output(live_server, chromium) -> None:
    async with SandboxEnv(live_server.url) as env:
        await env.reset(episode_id="inspect-page")
        await env.step("greeting = 'hello'\nprint('<b id=\"injected\">x</b>')")
        await env.step("1 / 0")
        async with browser(chromium) as page:  # the page follows an event stream: watched live, not dumped
            await page.goto(f"{live_server.url}/web/episodes/inspect-page?token={live_server.token}")
            await page.wait_for("document.querySelectorAll('#history .step').length === 2", "both steps")
            dom = await page.eval("document.documentElement.outerHTML")
        assert "greeting" in dom and "ZeroDivisionError" in dom
        # printed markup is shown as text, never parsed into the page
        assert '<b id="injected">' not in dom and '&lt;b id="injected"&gt;' in dom
        listing = rendered_dom(chromium, f"{live_server.url}/web?token={live_server.token}")
        assert "inspect-page" in listing and "/web/episodes/inspect-page" in listing


async def test_page_is_a_template_with_a_strict_csp(live_server) -> None:
    """The id reaches the page only as an escaped attribute; no inline script may run; the
    static route serves its fixed files and nothing else of the filesystem."""
    hostile = '"><img src=x onerror=alert(1)>'
    async with httpx.AsyncClient(base_url=live_server.url, headers=live_server.headers) as http:
        page = await http.get("/web/episodes/" + hostile)
        assert page.status_code == 200
        assert "<img src=x" not in page.text and "&#34;&gt;&lt;img src=x" in page.text
        csp = page.headers["content-security-policy"]
        assert "script-src 'self'" in csp and "unsafe-inline" not in csp and "default-src 'none'" in csp
        assert page.headers["referrer-policy"] == "no-referrer"
        script = await http.get("/web/static/episodes.js")
        assert script.status_code == 200 and script.headers["content-type"].startswith("text/javascript")
        assert "textContent" in script.text
        for name in ("web.py", "..%2fweb.py", "..%2F..%2Fpyproject.toml", "episodes.html"):
            assert (await http.get("/web/static/" + name)).status_code == 404, name
        assert (await httpx.AsyncClient(base_url=live_server.url).get("/web/static/episodes.js")).status_code == 401
