"""The live episode page in real headless Chromium (DevTools protocol): output appears while the
step runs, a matplotlib figure shows as an image, and markup or script the episode prints stays
text. The screenshots in docs/inspection.md come from here (SANDBOX_ENV_DOCS_SCREENSHOTS=docs/images)."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

import httpx
from browser import browser

from sandbox_env import SandboxEnv

FIGURE = ("import matplotlib\nmatplotlib.use('module://matplotlib_inline.backend_inline')\n"
          "import matplotlib.pyplot as plt\nxs = list(range(50))\nplt.plot(xs, [x * x for x in xs])\n"
          "plt.title('squares')\nplt.show()")
HOSTILE = ("print('<script>document.title = \"pwned\"</script><img src=x onerror=\"document.title=1\">')\n"
           "from IPython.display import HTML, SVG, display\n"
           "display(HTML('<script>document.title = \"html-pwned\"</script><b id=\"bold\">b</b>'))\n"
           "display(SVG('<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"40\" height=\"40\"><script>"
           "parent.document.title=\"svg\"</script><circle cx=\"20\" cy=\"20\" r=\"15\" fill=\"teal\"/></svg>'))")


async def shot(page: Any, tmp_path: Path, name: str) -> None:
    data = await page.screenshot(tmp_path / name)
    assert data.startswith(b"\x89PNG")
    if target := os.environ.get("SANDBOX_ENV_DOCS_SCREENSHOTS"):
        (Path(target) / name).write_bytes(data)


async def test_live_page_follows_a_running_step(live_server: Any, chromium: str, tmp_path: Path) -> None:
    async with SandboxEnv(live_server.url) as env, browser(chromium) as page:
        await env.reset(episode_id="live-page")
        for i in range(4):
            await env.step(f"data{i} = list(range({i * 1000}))\nprint('step', {i})")
        figure = await env.step(FIGURE)
        assert figure.observation.status.value == "ok", figure.observation.stderr
        await env.step("1 / 0")
        await page.goto(f"{live_server.url}/web/episodes/live-page?token={live_server.token}")
        await page.wait_for("document.querySelectorAll('#history .step').length === 6", "the six steps")
        widths = await page.wait_for("[...document.querySelectorAll('#history img.display')].map(i => i.naturalWidth)"
                                     ".filter(w => w > 100)", "the figure, decoded as an image")
        assert len(widths) == 1
        assert await page.eval("document.querySelectorAll('#timeline .tick').length") == 6
        assert await page.eval("document.querySelector('#timeline .tick.error').textContent") == "6"
        step = asyncio.create_task(env.step("import time\nfor i in range(3):\n    print('tick', i, flush=True)\n"
                                            "    time.sleep(0.2)\nbig = bytearray(30 << 20)\ntime.sleep(30)"))
        await page.wait_for("document.getElementById('live').textContent.includes('tick 2')", "the running step's output")
        assert not step.done()  # shown while the step still runs
        assert "time.sleep(30)" in await page.eval("document.querySelector('#running pre.code').textContent")
        await page.wait_for("document.getElementById('title').textContent.includes('running')", "the busy state")
        await asyncio.sleep(1.5)  # a few resource samples for the chart (not an assertion on time)
        await shot(page, tmp_path, "inspection-live.png")
        async with httpx.AsyncClient(base_url=live_server.url, headers=live_server.headers) as http:
            assert (await http.delete("/episodes/live-page")).status_code == 200
        await asyncio.wait_for(step, 60)
        await page.wait_for("document.getElementById('title').textContent.includes('closed')", "the end of the stream")


async def test_live_page_never_renders_sandbox_markup(live_server: Any, chromium: str, tmp_path: Path) -> None:
    async with SandboxEnv(live_server.url) as env, browser(chromium) as page:
        await env.reset(episode_id="markup")
        shown = await env.step(HOSTILE)
        assert shown.observation.status.value == "ok", shown.observation.stderr
        await page.goto(f"{live_server.url}/web/episodes/markup?token={live_server.token}")
        await page.wait_for("document.querySelectorAll('#history .step').length === 1", "the step")
        text = await page.eval("document.getElementById('history').textContent")
        assert '<script>document.title = "pwned"</script>' in text  # printed markup, shown as text
        assert await page.eval("document.title") == "sandbox-env episodes"
        assert await page.eval("document.querySelectorAll('script').length") == 1  # the page's own
        assert await page.eval("document.getElementById('bold'), document.querySelectorAll('#history b, #history img[src=x]').length") == 0
        svg = await page.wait_for("[...document.querySelectorAll('#history img.display')].map(i => i.src)", "the SVG")
        assert all(src.startswith("blob:") for src in svg)  # an image of the text: its script never runs
        assert "[text/html not rendered]" in text
        await shot(page, tmp_path, "inspection-markup.png")
        async with httpx.AsyncClient(base_url=live_server.url, headers=live_server.headers) as http:
            csp = (await http.get("/web/episodes/markup")).headers["content-security-policy"]
        assert "img-src 'self' data: blob:;" in csp and "unsafe-inline" not in csp and "script-src 'self'" in csp


# One big SVG (600 KB: `btoa(String.fromCharCode(...bytes))` overflows Chromium's stack), then a marker.
BIG_SVG = ("from IPython.display import SVG, display\n"
           "rects = ''.join(f'<rect x=\"{i % 100}\" y=\"{i // 100}\" width=\"1\" height=\"1\" fill=\"#3366cc\"/>' "
           "for i in range(12000))\n"
           "svg = '<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"100\" height=\"120\">' + rects + '</svg>'\n"
           "assert len(svg) > 600_000\ndisplay(SVG(svg))")


async def test_one_big_svg_never_hides_the_steps_after_it(live_server: Any, chromium: str) -> None:
    async with SandboxEnv(live_server.url) as env, browser(chromium) as page:
        await env.reset(episode_id="big-svg")
        shown = await env.step(BIG_SVG)
        assert shown.observation.status.value == "ok", shown.observation.stderr
        await env.step("print('MARKER-after-the-svg')")
        await page.goto(f"{live_server.url}/web/episodes/big-svg?token={live_server.token}")
        await page.wait_for("document.getElementById('history').textContent.includes('MARKER-after-the-svg')",
                            "the step after the SVG")
        assert await page.eval("document.querySelectorAll('#history .step').length") == 2
        assert await page.eval("document.querySelectorAll('#timeline .tick').length") == 2
        await page.wait_for("[...document.querySelectorAll('#history img.display')].some(i => i.naturalWidth === 100)",
                            "the big SVG, decoded as an image")
