"""The built documentation works in a real browser with no network.

The site is built with ``mkdocs build --strict`` into a temporary folder,
served on 127.0.0.1 and opened in headless Chromium (Debian's ``chromium``,
installed by ``make chromium``, a prerequisite of ``make test``). The browser
runs with every host name but the loopback address unresolvable, so a page
that still fetched anything from the internet would fail here even on a
machine that has a network.

The browser is driven through the Chrome DevTools protocol over a pipe
(``--remote-debugging-pipe``: JSON messages separated by NUL bytes on file
descriptors 3 and 4), so the test needs only the standard library.

Checked:

* every page loads with no console error, no uncaught exception, no failed
  request and no request that leaves the local server;
* every theory page holds typeset math (MathJax ``mjx-container``), no TeX
  error (``mjx-merror``) and no raw ``\\(`` or ``\\[`` left in its text;
* the plots on the results pages are images that load (``naturalWidth > 0``).
"""

from __future__ import annotations

import functools
import http.server
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome")
PAGE_TIMEOUT_S = 30.0


def _chromium() -> str:
    for name in CHROMIUM_NAMES:
        path = shutil.which(name)
        if path:
            return path
    msg = f"no headless browser found (looked for {', '.join(CHROMIUM_NAMES)} on PATH); run `make chromium`"
    raise FileNotFoundError(msg)


class DevTools:
    """A minimal Chrome DevTools protocol client over ``--remote-debugging-pipe``.

    One page target, attached in flat mode; events are kept in arrival order
    until :meth:`drain_events` hands them over.
    """

    def __init__(self, binary: str, profile: Path) -> None:
        to_browser_r, self._to_browser = os.pipe()
        self._from_browser, from_browser_w = os.pipe()
        args = [
            binary,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
            "--disable-extensions",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            # offline: every host but loopback fails to resolve
            "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1",
            f"--user-data-dir={profile}",
            "--remote-debugging-pipe",
            "--window-size=1280,1000",
            "about:blank",
        ]

        def wire_fds() -> None:  # the protocol's fixed descriptors: 3 reads, 4 writes
            high_r, high_w = os.dup2(to_browser_r, 100), os.dup2(from_browser_w, 101)  # out of 3 and 4's way
            os.dup2(high_r, 3)
            os.dup2(high_w, 4)

        self._proc = subprocess.Popen(
            args,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            pass_fds=(3, 4),  # kept open after wire_fds; every other descriptor is closed
            preexec_fn=wire_fds,  # noqa: PLW1509 (no threads touch the descriptors meanwhile)
        )
        os.close(to_browser_r)
        os.close(from_browser_w)
        self._buffer = b""
        self._next_id = 0
        self._events: list[dict] = []
        self._session: str | None = None
        target = self.call("Target.createTarget", url="about:blank")["targetId"]
        self._session = self.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        for domain in ("Page", "Runtime", "Log", "Network"):
            self.call(f"{domain}.enable")

    def _read_message(self, deadline: float) -> dict:
        while b"\0" not in self._buffer:
            if time.monotonic() > deadline:
                msg = f"the browser sent nothing for {PAGE_TIMEOUT_S:.0f} s"
                raise TimeoutError(msg)
            chunk = os.read(self._from_browser, 1 << 16)
            if not chunk:
                msg = f"the browser closed the DevTools pipe (exit code {self._proc.poll()})"
                raise ConnectionError(msg)
            self._buffer += chunk
        raw, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(raw)

    def call(self, method: str, **params) -> dict:
        """Send one command and return its result; events seen meanwhile are kept."""
        self._next_id += 1
        message: dict = {"id": self._next_id, "method": method, "params": params}
        if self._session is not None:
            message["sessionId"] = self._session
        os.write(self._to_browser, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + PAGE_TIMEOUT_S
        while True:
            reply = self._read_message(deadline)
            if reply.get("id") == self._next_id:
                if "error" in reply:
                    msg = f"{method} failed: {reply['error']}"
                    raise RuntimeError(msg)
                return reply["result"]
            if "method" in reply:
                self._events.append(reply)

    def wait_for(self, method: str) -> dict:
        """Block until the event ``method`` arrives (it stays in the event list)."""
        deadline = time.monotonic() + PAGE_TIMEOUT_S
        for event in self._events:
            if event["method"] == method:
                return event
        while True:
            event = self._read_message(deadline)
            if "method" in event:
                self._events.append(event)
                if event["method"] == method:
                    return event

    def drain_events(self) -> list[dict]:
        events, self._events = self._events, []
        return events

    def evaluate(self, expression: str):
        """The value of a JavaScript expression (promises awaited)."""
        result = self.call("Runtime.evaluate", expression=expression, awaitPromise=True, returnByValue=True)
        if "exceptionDetails" in result:
            msg = f"page script failed: {result['exceptionDetails']}"
            raise RuntimeError(msg)
        return result["result"].get("value")

    def close(self) -> None:
        try:
            self._session = None
            self.call("Browser.close")
        except (ConnectionError, TimeoutError, RuntimeError):
            pass
        finally:
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
            os.close(self._to_browser)
            os.close(self._from_browser)


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("browser") / "site"
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1")
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, f"mkdocs build --strict failed:\n{proc.stdout}\n{proc.stderr}"
    return out


@pytest.fixture(scope="module")
def server(site) -> Iterator[str]:
    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(site)))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}/"
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join()


@pytest.fixture(scope="module")
def browser(tmp_path_factory) -> Iterator[DevTools]:
    tools = DevTools(_chromium(), tmp_path_factory.mktemp("chromium-profile"))
    try:
        yield tools
    finally:
        tools.close()


def _page_uris(site: Path) -> list[str]:
    """Every generated page (``.../index.html``), as a path under the site root."""
    return sorted(
        p.relative_to(site).parent.as_posix() + "/" if p.parent != site else ""
        for p in site.rglob("index.html")
        if "assets" not in p.relative_to(site).parts
    )


def _problems(events: list[dict], base: str) -> list[str]:
    """Console errors, exceptions, failed and off-site requests among the events."""
    found = []
    for event in events:
        method, params = event["method"], event.get("params", {})
        if method == "Runtime.exceptionThrown":
            details = params["exceptionDetails"]
            found.append(f"exception: {details.get('exception', {}).get('description') or details.get('text')}")
        elif method == "Runtime.consoleAPICalled" and params["type"] in ("error", "assert"):
            found.append(f"console.{params['type']}: {[a.get('value') for a in params['args']]}")
        elif method == "Log.entryAdded" and params["entry"]["level"] == "error":
            found.append(f"log: {params['entry']['text']} ({params['entry'].get('url', '')})")
        elif method == "Network.loadingFailed" and not params.get("canceled"):
            found.append(f"request failed: {params.get('errorText')} (type {params.get('type')})")
        elif method == "Network.requestWillBeSent":
            url = params["request"]["url"]
            if not url.startswith((base, "data:", "blob:", "about:")):
                found.append(f"off-site request: {url}")
    return found


def _open(browser: DevTools, url: str) -> list[dict]:
    """Navigate, wait for the load event and for MathJax to finish; return the page's events."""
    browser.drain_events()
    browser.call("Page.navigate", url=url)
    browser.wait_for("Page.loadEventFired")
    # the math typesets after load; wait for it, where the page has MathJax at all
    browser.evaluate("window.MathJax && MathJax.startup && MathJax.startup.promise ? MathJax.startup.promise : null")
    return browser.drain_events()


MATH_STATE = r"""(() => {
  const article = document.querySelector("article");
  const spans = [...article.querySelectorAll(".arithmatex")];
  const text = [...article.querySelectorAll("p, li, td, th, h1, h2, h3, h4, dd, dt")]
    .map(e => e.innerText).join("\n");
  return {
    arithmatex: spans.length,
    typeset: article.querySelectorAll("mjx-container").length,
    untypeset: spans.filter(s => !s.querySelector("mjx-container")).map(s => s.textContent.slice(0, 80)),
    tex_errors: [...article.querySelectorAll("mjx-merror")].map(e => e.getAttribute("data-mjx-error")),
    raw_delimiters: (text.match(/\\[(\[]/g) || []).length,
  };
})()"""

IMAGES_STATE = """[...document.querySelectorAll("article img")].map(
  i => ({src: i.currentSrc || i.src, complete: i.complete, width: i.naturalWidth, height: i.naturalHeight}))"""


def test_every_page_loads_offline_without_errors(site, server, browser):
    pages = _page_uris(site)
    assert len(pages) >= 20, f"expected the whole site, found {len(pages)} pages: {pages}"
    failures = {}
    for page in pages:
        problems = _problems(_open(browser, server + page), server)
        if problems:
            failures[page or "/"] = problems
    assert not failures, json.dumps(failures, indent=1)


def test_theory_pages_show_typeset_math(site, server, browser):
    theory = [p for p in _page_uris(site) if p.startswith("theory/")]
    assert len(theory) >= 7, f"expected the theory pages, found {theory}"
    for page in theory:
        _open(browser, server + page)
        state = browser.evaluate(MATH_STATE)
        assert state["arithmatex"] > 0, f"{page}: no math on a theory page"
        assert state["typeset"] >= state["arithmatex"], f"{page}: math not typeset: {state}"
        assert state["untypeset"] == [], f"{page}: formulas left as TeX: {state['untypeset']}"
        assert state["tex_errors"] == [], f"{page}: MathJax TeX errors: {state['tex_errors']}"
        assert state["raw_delimiters"] == 0, f"{page}: raw \\( or \\[ in the text: {state}"


def test_results_plots_are_images_that_load(site, server, browser):
    pages = [p for p in _page_uris(site) if p.startswith("results/")]
    images = []
    for page in pages:
        _open(browser, server + page)
        images += browser.evaluate(IMAGES_STATE)
    plots = [i for i in images if i["src"].endswith(".png")]
    pngs_in_source = sorted((ROOT / "docs" / "results").glob("*.png"))
    assert len(plots) >= len(pngs_in_source) > 0, f"{len(plots)} plots shown, {len(pngs_in_source)} in docs/results"
    broken = [i for i in plots if not (i["complete"] and i["width"] > 0 and i["height"] > 0)]
    assert broken == [], f"plots that did not load: {broken}"
