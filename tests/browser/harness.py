"""Shared machinery for the real-browser tests and for ``benchmarks/browser_latency.py``.

It starts JupyterLab, Notebook 7 and Voilà as plain subprocesses that we own by pid, launches
the system Chromium through Playwright, writes the explorer notebook, and carries the page-side
JavaScript that finds the explorer's heatmap and moves its Temperature slider.

Playwright is imported lazily (only inside functions) so that collecting the test suite never
breaks on a machine that lacks it; the fixtures then fail with a clear message instead.
"""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from tests.ports import reserved_port

if TYPE_CHECKING:
    from playwright.sync_api import Browser, Locator, Page, Playwright

REPO_ROOT = Path(__file__).resolve().parents[2]
SCREENSHOT_DIR = REPO_ROOT / "artifacts" / "screenshots"

# Debian's chromium; Playwright's own browser download cannot run on these offline machines.
CHROMIUM = Path(os.environ.get("PULLBACK_CHROMIUM", "/usr/bin/chromium"))
CHROMIUM_ARGS = [
    "--headless=new",
    "--no-sandbox",  # we run as root in CI, where the sandbox refuses to start
    "--disable-gpu",
    "--disable-dev-shm-usage",  # small /dev/shm in containers makes tabs crash
    "--disable-background-networking",
    "--disable-component-update",
    "--no-proxy-server",  # the servers are on loopback; never route them through an env proxy
]

# The module the notebook imports as ``pw``. Override with PULLBACK_BROWSER_MODULE to point the
# harness at a stand-in module (it must be importable by the kernel, e.g. through PYTHONPATH,
# which the servers and hence their kernels inherit).
EXPLORER_MODULE = os.environ.get("PULLBACK_BROWSER_MODULE", "pullback_widgets")


def explorer_cells(module: str = EXPLORER_MODULE) -> list[str]:
    """The notebook's code cells; the explorer is the last expression, so it is displayed."""
    return [
        f"import {module} as pw",
        'pw.PullbackExplorer(model="efficientnet_lite0", image="coffee")',
    ]


NOTEBOOK_NAME = "explorer.ipynb"
TEMPERATURE_LABEL = "Temperature"

# Every limit here only stops a hang (the benchmarks measure speed): each is far above what a
# busy, shared 2-core CI machine takes, where everything is several times slower than idle.
SERVER_START_TIMEOUT_S = 180.0
SERVER_STOP_GRACE_S = 15.0
# Kernel start, imports, model load and the first CPU forward pass all happen before the first
# heatmap appears; on a busy 2-core CI machine that can take a while.
FIRST_RENDER_TIMEOUT_MS = 300_000
UPDATE_TIMEOUT_MS = 60_000


# --------------------------------------------------------------------------------------------
# Servers
# --------------------------------------------------------------------------------------------


class ServerError(RuntimeError):
    """A server did not come up; the message carries the tail of its log."""


@dataclass
class Server:
    """A server subprocess that we started, known by its own pid, with its log file."""

    name: str
    popen: subprocess.Popen[bytes]
    port: int
    log_path: Path
    _log: IO[bytes] = field(repr=False)

    @property
    def pid(self) -> int:
        return self.popen.pid

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log_tail(self, lines: int = 60) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError as exc:
            return f"(no log: {exc})"
        return "\n".join(text.splitlines()[-lines:])

    def wait_until_serving(self, path: str, timeout_s: float = SERVER_START_TIMEOUT_S) -> None:
        """Poll ``path`` until the server answers it; fail early if the process dies."""
        # No proxy: an http_proxy in the environment must not intercept loopback requests.
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        deadline = time.monotonic() + timeout_s
        while True:
            code = self.popen.poll()
            if code is not None:
                raise ServerError(
                    f"{self.name} (pid {self.pid}) exited with code {code} before serving.\n"
                    f"--- log tail ({self.log_path}) ---\n{self.log_tail()}"
                )
            try:
                with opener.open(self.url + path, timeout=2) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass  # not listening yet
            if time.monotonic() > deadline:
                raise ServerError(
                    f"{self.name} (pid {self.pid}) did not answer {self.url}{path} within "
                    f"{timeout_s:.0f} s.\n--- log tail ({self.log_path}) ---\n{self.log_tail()}"
                )
            time.sleep(0.25)

    def stop(self, grace_s: float = SERVER_STOP_GRACE_S) -> None:
        """SIGTERM our pid (the server shuts its kernels down itself), SIGKILL if it lingers."""
        try:
            if self.popen.poll() is None:
                self.popen.send_signal(signal.SIGTERM)
                try:
                    self.popen.wait(grace_s)
                except subprocess.TimeoutExpired:
                    self.popen.kill()
                    self.popen.wait(5)
        finally:
            self._log.close()


def _offline_env(workdir: Path) -> dict[str, str]:
    """Environment for a server: Jupyter's per-user dirs inside ``workdir``, nothing global.

    Kernel specs and lab extensions installed in the venv (sys.prefix/share/jupyter) are still
    found, so the kernel is this venv's Python and ipywidgets/anywidget render.
    """
    env = dict(os.environ)
    env.update(
        JUPYTER_PLATFORM_DIRS="1",
        JUPYTER_CONFIG_DIR=str(workdir / "config"),
        JUPYTER_DATA_DIR=str(workdir / "data"),
        JUPYTER_RUNTIME_DIR=str(workdir / "runtime"),
        IPYTHONDIR=str(workdir / "ipython"),
        PYTHONUNBUFFERED="1",
    )
    for name in ("config", "data", "runtime", "ipython"):
        (workdir / name).mkdir(parents=True, exist_ok=True)
    return env


def _spawn(name: str, args: Sequence[str], workdir: Path, port: int) -> Server:
    workdir.mkdir(parents=True, exist_ok=True)
    log_path = workdir / f"{name}.log"
    log = log_path.open("wb")
    # The command is the Python interpreter itself (no shell, no launcher script), so
    # Popen.pid is the server's own pid. A new session keeps a Ctrl-C aimed at pytest from
    # reaching the server too; our teardown stops it.
    popen = subprocess.Popen(
        [sys.executable, *args],
        cwd=workdir,
        env=_offline_env(workdir),
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    return Server(name=name, popen=popen, port=port, log_path=log_path, _log=log)


def _write_lab_settings(settings_dir: Path) -> None:
    """User settings that keep Lab and Notebook 7 quiet and offline: no news toast, no update
    check."""
    path = settings_dir / "@jupyterlab" / "apputils-extension" / "notification.jupyterlab-settings"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text('{"fetchNews": "false", "checkForUpdates": false}\n')


def _jupyter_server_args(root_dir: Path, workdir: Path, port: int, app: str) -> list[str]:
    """Arguments for JupyterLab (``app`` "LabApp") or Notebook 7 ("JupyterNotebookApp").

    Both are jupyter_server applications that load the jupyterlab server extension, so the
    same offline LabApp settings apply to both; user settings and workspaces are the app's own.
    """
    settings_dir = workdir / "lab-settings"
    workspaces_dir = workdir / "lab-workspaces"
    _write_lab_settings(settings_dir)
    workspaces_dir.mkdir(parents=True, exist_ok=True)
    return [
        "--no-browser",
        "--ip=127.0.0.1",
        f"--port={port}",
        # Fail rather than silently take another port.
        "--ServerApp.port_retries=0",
        # No auth: the server only listens on loopback, for the length of the tests.
        "--IdentityProvider.token=",
        "--ServerApp.password=",
        "--ServerApp.allow_root=True",  # CI runs as root
        f"--ServerApp.root_dir={root_dir}",
        "--ServerApp.terminals_enabled=False",
        # Offline and quiet: no news feed, no update check, no PyPI extension manager.
        "--LabApp.news_url=None",
        "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
        "--LabApp.extension_manager=readonly",
        f"--{app}.user_settings_dir={settings_dir}",
        f"--{app}.workspaces_dir={workspaces_dir}",
    ]


def _start_jupyter(name: str, module: str, app: str, root_dir: Path, workdir: Path) -> Server:
    port = reserved_port()
    # ``-m <module>`` runs the application in this very process (the ``jupyter lab`` and
    # ``jupyter notebook`` scripts would exec another one first), so the pid is the server's.
    server = _spawn(
        name,
        ["-m", module, *_jupyter_server_args(root_dir, workdir, port, app)],
        workdir,
        port,
    )
    try:
        server.wait_until_serving("/api/status")
    except BaseException:
        server.stop()
        raise
    return server


def start_jupyterlab(root_dir: Path, workdir: Path) -> Server:
    """Start JupyterLab 4 serving ``root_dir`` without auth; returns once /api/status answers."""
    return _start_jupyter("jupyterlab", "jupyterlab", "LabApp", root_dir, workdir)


def start_notebook7(root_dir: Path, workdir: Path) -> Server:
    """Start Notebook 7 (``jupyter notebook``) serving ``root_dir`` without auth; returns once
    /api/status answers."""
    return _start_jupyter("notebook7", "notebook", "JupyterNotebookApp", root_dir, workdir)


def start_voila(notebook: Path, workdir: Path) -> Server:
    """Start Voilà on one notebook; returns once its static files are served.

    We poll a static file, not "/", because every GET of "/" starts a kernel and runs the
    notebook.
    """
    port = reserved_port()
    server = _spawn(
        "voila",
        [
            "-m",
            "voila",
            str(notebook),
            "--no-browser",
            f"--port={port}",
            "--Voila.ip=127.0.0.1",
            "--Voila.port_retries=0",
            "--show_tracebacks=True",
        ],
        workdir,
        port,
    )
    try:
        server.wait_until_serving("/voila/static/voila.js")
    except BaseException:
        server.stop()
        raise
    return server


def write_explorer_notebook(path: Path, module: str = EXPLORER_MODULE) -> Path:
    """Write the explorer notebook with the venv's ``python3`` kernel, so no kernel dialog."""
    import nbformat

    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(source) for source in explorer_cells(module)]
    nb.metadata["kernelspec"] = {
        "name": "python3",
        "display_name": "Python 3 (ipykernel)",
        "language": "python",
    }
    nb.metadata["language_info"] = {"name": "python"}
    path.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, path)
    return path


# --------------------------------------------------------------------------------------------
# Browser
# --------------------------------------------------------------------------------------------


def start_playwright() -> Playwright:
    try:
        from playwright.sync_api import sync_playwright
    except ImportError as exc:
        raise RuntimeError(
            "The browser tests need the 'playwright' Python package (pip install playwright; "
            "never 'playwright install': the system Chromium is used). "
            "Set PULLBACK_SKIP_BROWSER=1 to skip them."
        ) from exc
    return sync_playwright().start()


def launch_chromium(playwright: Playwright) -> Browser:
    if not CHROMIUM.exists():
        raise RuntimeError(
            f"No Chromium at {CHROMIUM}: apt-get install -y chromium (or set PULLBACK_CHROMIUM). "
            "Set PULLBACK_SKIP_BROWSER=1 to skip the browser tests."
        )
    return playwright.chromium.launch(
        executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True
    )


# Console errors and uncaught exceptions of each page we opened, keyed by id(page): shown when a
# test fails, since a broken widget usually says why only in the browser console.
_CONSOLE: dict[int, list[str]] = {}


def new_page(browser: Browser) -> Page:
    """A fresh page (own context, so no state leaks between tests) with our JS helpers."""
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    context.add_init_script(PAGE_HELPERS_JS)
    page = context.new_page()
    page.set_default_timeout(UPDATE_TIMEOUT_MS)
    messages = _CONSOLE.setdefault(id(page), [])

    def on_console(msg: Any) -> None:
        if msg.type in ("error", "warning"):
            messages.append(f"{msg.type}: {msg.text}")

    page.on("console", on_console)
    page.on("pageerror", lambda exc: messages.append(f"pageerror: {exc}"))
    return page


def close_page(page: Page) -> None:
    _CONSOLE.pop(id(page), None)
    page.context.close()


def console_messages(page: Page) -> list[str]:
    return list(_CONSOLE.get(id(page), []))


def save_screenshot(page: Page, name: str) -> Path:
    SCREENSHOT_DIR.mkdir(parents=True, exist_ok=True)
    path = SCREENSHOT_DIR / f"{name}.png"
    page.screenshot(path=str(path))
    return path


# Installed into every page as window.__pullbackHarness. Plotly keeps a figure's traces on its
# graph div (class js-plotly-plot): ``data`` as given, ``_fullData`` after defaults, where
# base64 ("bdata") arrays from plotly>=6 are already decoded. The explorer's first FigureWidget
# is the pullback heatmap, so we read the first heatmap trace of the first graph div in
# document order (the later figures, e.g. a gradient heatmap, must not stand in for it).
PAGE_HELPERS_JS = r"""
(() => {
  function fold(value, acc) {
    if (value === null || value === undefined) return;
    if (typeof value === 'number') {
      const v = Number.isFinite(value) ? value : 0;
      acc.n += 1;
      acc.sum += v;
      acc.wsum += v * ((acc.n % 9973) + 1);  // position-weighted, so a permutation changes it
      return;
    }
    if (Array.isArray(value) || ArrayBuffer.isView(value)) {
      for (const item of value) fold(item, acc);
      return;
    }
    if (typeof value === 'object' && typeof value.bdata === 'string') {
      // A still-encoded typed array: hash its text instead.
      for (let i = 0; i < value.bdata.length; i++) {
        acc.n += 1;
        acc.wsum = (acc.wsum * 31 + value.bdata.charCodeAt(i)) % 2147483647;
      }
    }
  }
  function heatmap() {
    const gd = document.querySelector('.js-plotly-plot');
    if (!gd) return null;
    const traces = (gd._fullData && gd._fullData.length) ? gd._fullData : (gd.data || []);
    const trace = traces.find((t) => t && t.type === 'heatmap');
    return trace ? {gd, trace} : null;
  }
  function summary() {
    const found = heatmap();
    if (!found) return null;
    const acc = {n: 0, sum: 0, wsum: 0};
    fold(found.trace.z, acc);
    return {count: acc.n, checksum: `${acc.n}:${acc.sum}:${acc.wsum}`};
  }
  // Arm a one-shot latency probe: from the next keydown the page sees to the first moment the
  // heatmap's z differs from `before`. A MutationObserver on the graph div catches Plotly's
  // redraw as it happens; requestAnimationFrame polling is the fallback.
  function armLatencyProbe(before) {
    const state = {t0: null, ms: null};
    window.__pullbackHarness.probe = state;
    window.addEventListener('keydown', () => {
      if (state.t0 === null) state.t0 = performance.now();
    }, {capture: true, once: true});
    const found = heatmap();
    let observer = null;
    const check = () => {
      if (state.ms !== null || state.t0 === null) return;
      const now = summary();
      if (now && now.checksum !== before) {
        state.ms = performance.now() - state.t0;
        if (observer) observer.disconnect();
      }
    };
    if (found) {
      observer = new MutationObserver(check);
      observer.observe(found.gd, {subtree: true, childList: true, attributes: true});
    }
    const poll = () => { check(); if (state.ms === null) requestAnimationFrame(poll); };
    requestAnimationFrame(poll);
  }
  // JupyterLab's kernel indicator reads "idle" for a moment before the kernel even starts
  // (then initializing, connecting, ..., idle): note when it has been anything else, so that
  // "idle" can be trusted to mean a connected kernel.
  // The indicator can also be created already past "idle" (a kernel that starts before Lab
  // draws it), so new indicators count too, not only changed ones.
  const labKernel = {sawStartup: false};
  const noteStatus = (element) => {
    const status = element.getAttribute('data-status');
    if (element.classList.contains('jp-Notebook-ExecutionIndicator') && status
        && status !== 'idle') {
      labKernel.sawStartup = true;
    }
  };
  new MutationObserver((records) => {
    for (const record of records) {
      if (record.type === 'attributes') noteStatus(record.target);
      for (const node of record.addedNodes) {
        if (node.nodeType !== Node.ELEMENT_NODE) continue;
        noteStatus(node);
        node.querySelectorAll('.jp-Notebook-ExecutionIndicator').forEach(noteStatus);
      }
    }
  }).observe(document, {subtree: true, childList: true, attributes: true,
                        attributeFilter: ['data-status']});
  window.__pullbackHarness = {summary, armLatencyProbe, probe: null, labKernel};
})();
"""


def wait_for_js(page: Page, expression: str, arg: Any, timeout_ms: float, failure: str) -> None:
    """page.wait_for_function, but a timeout becomes an AssertionError that says what failed."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    try:
        page.wait_for_function(expression, arg=arg, timeout=timeout_ms)
    except PlaywrightTimeout:
        raise AssertionError(f"{failure} (waited {timeout_ms / 1000:.0f} s)") from None


def heatmap_summary(page: Page) -> dict[str, Any] | None:
    """``{"count": n, "checksum": str}`` of the explorer heatmap's z, or None if not drawn."""
    return page.evaluate("() => window.__pullbackHarness.summary()")


def wait_for_heatmap(page: Page, timeout_ms: float = FIRST_RENDER_TIMEOUT_MS) -> str:
    """Wait until the heatmap is drawn with non-empty z; returns its checksum."""
    wait_for_js(
        page,
        "() => { const s = window.__pullbackHarness.summary(); return s && s.count > 0; }",
        None,
        timeout_ms,
        "No plotly heatmap with non-empty z appeared on the page",
    )
    summary = heatmap_summary(page)
    assert summary is not None
    return summary["checksum"]


# The explorer's figures (pullback, compared map, strip) and the page's count of Plotly bundles
# evaluated, which pullback_widgets.widgets.figure_widget's loader keeps on globalThis.
EXPLORER_FIGURES = 3
FIGURES_AND_BUNDLES_JS = """() => [document.querySelectorAll('.js-plotly-plot').length,
  (globalThis[Symbol.for('pullback-widgets/plotly-bundles')] || new Map()).size]"""


def assert_figures_drawn_from_one_bundle(page: Page, timeout_ms: float = UPDATE_TIMEOUT_MS
                                         ) -> None:
    """Every figure of the explorer has drawn, and the page evaluated Plotly's 5 MB bundle once
    for all of them (each evaluation is 1.6 s of a 2-core machine's browser, and anywidget
    drops a figure whose module takes over 2 s)."""
    wait_for_js(page, f"() => ({FIGURES_AND_BUNDLES_JS})()[0] >= {EXPLORER_FIGURES}", None,
                timeout_ms, f"Fewer than {EXPLORER_FIGURES} Plotly figures drew on the page")
    figures, bundles = page.evaluate(FIGURES_AND_BUNDLES_JS)
    assert (figures, bundles) == (EXPLORER_FIGURES, 1)


def wait_for_heatmap_change(page: Page, before: str, timeout_ms: float = UPDATE_TIMEOUT_MS,
                            after: str = "the Temperature slider moved") -> str:
    """Wait until the heatmap's checksum differs from ``before``; returns the new one.

    ``after`` names what should have changed it, for the failure message."""
    wait_for_js(
        page,
        "(before) => { const s = window.__pullbackHarness.summary();"
        " return s && s.count > 0 && s.checksum !== before; }",
        before,
        timeout_ms,
        f"The heatmap's z did not change after {after}",
    )
    summary = heatmap_summary(page)
    assert summary is not None
    return summary["checksum"]


def wait_for_heatmap_settled(
    page: Page, quiet_ms: float = 1000, timeout_ms: float = UPDATE_TIMEOUT_MS
) -> str:
    """Wait until the heatmap's z has stayed the same for ``quiet_ms``; returns its checksum.

    So that a late update of the first render is not mistaken for the slider's effect.
    """
    wait_for_js(
        page,
        """(quietMs) => {
          const h = window.__pullbackHarness;
          const s = h.summary();
          const now = performance.now();
          if (!s || s.checksum !== h.lastChecksum) {
            h.lastChecksum = s && s.checksum;
            h.lastChange = now;
            return false;
          }
          return now - h.lastChange >= quietMs;
        }""",
        quiet_ms,
        timeout_ms,
        f"The heatmap kept changing; it was never still for {quiet_ms:.0f} ms",
    )
    summary = heatmap_summary(page)
    assert summary is not None
    return summary["checksum"]


def temperature_slider(page: Page) -> Locator:
    """The ipywidgets slider row whose description label reads exactly "Temperature"."""
    label = page.locator(".widget-label", has_text=re.compile(rf"^\s*{TEMPERATURE_LABEL}\s*$"))
    return page.locator(".widget-slider").filter(has=label).first


def temperature_label(page: Page) -> Locator:
    return temperature_slider(page).locator(".widget-label").first


def temperature_readout(page: Page) -> str:
    """The value the Temperature slider shows beside it."""
    return temperature_slider(page).locator(".widget-readout").first.inner_text().strip()


def label_overflow(label: Locator) -> tuple[int, int]:
    """(scrollWidth, clientWidth) of a label: text wider than its box is cut by CSS ellipsis."""
    widths = label.evaluate("(el) => [el.scrollWidth, el.clientWidth]")
    return widths[0], widths[1]


def temperature_handle(page: Page) -> Locator:
    """The slider's noUiSlider handle (ipywidgets 8), which takes arrow keys when focused."""
    return temperature_slider(page).locator(".noUi-handle").first


def press_temperature(page: Page, presses: int = 1, key: str | None = None) -> str:
    """Focus the Temperature handle and press an arrow key ``presses`` times; returns the key.

    Without ``key`` we step right, or left when the handle already sits at its maximum.
    """
    handle = temperature_handle(page)
    handle.scroll_into_view_if_needed()
    handle.focus()
    if key is None:
        key = "ArrowLeft" if handle_at_bound(handle) == "max" else "ArrowRight"
    for _ in range(presses):
        page.keyboard.press(key)
    return key


def handle_at_bound(handle: Locator) -> str | None:
    """Which end ("min" or "max") a noUiSlider handle sits at, from its ARIA values, if any."""
    now, low, high = handle.evaluate(
        "(el) => ['aria-valuenow', 'aria-valuemin', 'aria-valuemax']"
        ".map((name) => parseFloat(el.getAttribute(name)))"
    )
    # A missing attribute reads as NaN, which compares false both ways: no bound.
    if now >= high:
        return "max"
    if now <= low:
        return "min"
    return None


def drag_temperature(page: Page, px: float = 40) -> None:
    """Drag the Temperature handle ``px`` pixels with the mouse: right, or left at the max."""
    handle = temperature_handle(page)
    handle.scroll_into_view_if_needed()
    if handle_at_bound(handle) == "max":
        px = -px
    box = handle.bounding_box()
    assert box is not None, "The Temperature handle is not laid out"
    x, y = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
    page.mouse.move(x, y)
    page.mouse.down()
    page.mouse.move(x + px, y, steps=5)  # in steps, like a hand, not one jump
    page.mouse.up()


def choose_option(page: Page, description: str, option_text: str) -> None:
    """Choose the option whose text contains ``option_text`` in the Dropdown ``description``."""
    select = page.locator(".widget-dropdown", has=page.locator(
        "label", has_text=description)).locator("select").first
    select.evaluate("""(select, wanted) => {
      // ipywidgets writes every space of an option as a non-breaking one.
      const text = (o) => o.text.replace(/\u00a0/g, ' ');
      const index = [...select.options].findIndex((o) => text(o).includes(wanted));
      if (index < 0) throw new Error('no option ' + wanted + ' among ' +
                                     [...select.options].map((o) => o.text).join('|'));
      select.selectedIndex = index;
      select.dispatchEvent(new Event('change', {bubbles: true}));
    }""", option_text)


def assert_temperature_label_fully_visible(page: Page) -> None:
    """The "Temperature" description is on screen and not cut short by an ellipsis."""
    label = temperature_label(page)
    label.scroll_into_view_if_needed()
    assert label.is_visible(), f"The {TEMPERATURE_LABEL!r} label is not visible"
    needed, shown = label_overflow(label)
    assert needed <= shown, (
        f"The {TEMPERATURE_LABEL!r} label is truncated: its text needs {needed} px but its box "
        f"is {shown} px wide (ipywidgets cuts descriptions with an ellipsis; give the slider "
        'style={"description_width": "initial"} or a wider description_width)'
    )


def assert_first_seconds(page: Page, first_checksum: str) -> None:
    """What a newcomer sees first: the Temperature readout shows the model's default exactly
    (0.7, not a log slider's snapped 0.708), the first heatmap is drawn once and not redrawn at
    a snapped value, the photo is shown, the status line says when the map was drawn, the
    Target box names the class drawn, and no Plotly mode bar covers a panel title."""
    readout = temperature_readout(page)
    assert readout == "0.7", readout
    assert wait_for_heatmap_settled(page, quiet_ms=3000) == first_checksum
    assert page.locator(".widget-image img, img.widget-image").first.is_visible()
    page.locator(".widget-html", has_text="drawn in").first.wait_for(timeout=UPDATE_TIMEOUT_MS)
    wait_for_js(page, "() => [...document.querySelectorAll('.widget-text input[list]')]"
                ".some((box) => box.value === 'espresso (967)')", None, UPDATE_TIMEOUT_MS,
                "The Target box does not name the class drawn (espresso)")
    assert page.locator(".js-plotly-plot .modebar").count() == 0


def click_temperature_step(page: Page, sign: str = "+") -> None:
    """Click the − or + button beside the Temperature slider."""
    page.locator(".widget-button", has_text=re.compile(rf"^\s*{re.escape(sign)}\s*$")).first.click()


def assert_temperature_moves_heatmap(page: Page, presses: int = 3) -> None:
    """Arrow keys on the focused Temperature handle change the heatmap's z."""
    before = wait_for_heatmap_settled(page)
    key = press_temperature(page, presses)
    try:
        after = wait_for_heatmap_change(page, before)
    except AssertionError as exc:
        raise AssertionError(f"{exc}; pressed {key} {presses} times") from None
    assert after != before


def assert_changes_heatmap(page: Page, act: Callable[[], object], what: str) -> str:
    """Once the heatmap is still, ``act()`` (described by ``what``) redraws it with a new z;
    returns the new checksum."""
    before = wait_for_heatmap_settled(page)
    act()
    return wait_for_heatmap_change(page, before, after=what)


# --------------------------------------------------------------------------------------------
# JupyterLab and Notebook 7 pages
# --------------------------------------------------------------------------------------------
# Notebook 7 is built from JupyterLab's own components: the same notebook panel, kernel
# indicator and Lumino menu bar, so the helpers below serve both.

KERNEL_START_TIMEOUT_MS = 120_000


def wait_for_lab_kernel_idle(page: Page, timeout_ms: float = KERNEL_START_TIMEOUT_MS,
                             server: Server | None = None) -> None:
    """Wait until the notebook's kernel has started, connected and gone idle.

    With ``server``, a kernel the page never saw starting (it started before Lab drew the
    indicator) is accepted once the server reports every kernel idle and the indicator reads
    idle; otherwise the failure says what the page and the server showed.
    """
    try:
        wait_for_js(
            page,
            """() => {
              const el = document.querySelector('.jp-Notebook-ExecutionIndicator');
              const kernel = window.__pullbackHarness.labKernel;
              if (el !== null && el.dataset.status && el.dataset.status !== 'idle') {
                kernel.sawStartup = true;  // polled too, in case a mutation was missed
              }
              return kernel.sawStartup && el !== null && el.dataset.status === 'idle';
            }""",
            None,
            timeout_ms,
            "JupyterLab's kernel never became idle",
        )
    except AssertionError as failure:
        shown = page.evaluate("""() => {
          const el = document.querySelector('.jp-Notebook-ExecutionIndicator');
          return {indicator: el === null ? null : el.dataset.status ?? null,
                  sawStartup: window.__pullbackHarness.labKernel.sawStartup};
        }""")
        kernels = None if server is None else _server_kernel_states(server)
        if shown["indicator"] == "idle" and kernels and set(kernels) == {"idle"}:
            return
        raise AssertionError(f"{failure}; the page showed {shown}, the server's kernels "
                             f"{kernels}") from None


def _server_kernel_states(server: Server) -> list[str] | None:
    """The execution state of each kernel the server runs, or None if it does not answer."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback: no proxy
    try:
        with opener.open(f"{server.url}/api/kernels", timeout=5) as response:
            return [kernel.get("execution_state") for kernel in json.load(response)]
    except (OSError, ValueError):
        return None


def run_in_notebook_kernel(server: Server, notebook: str, code: str,
                           timeout_s: float = 60.0) -> str:
    """Run ``code`` in the kernel of ``notebook``'s session on ``server`` (as a second client,
    through the connection file the server wrote) and return what it printed to stdout."""
    from jupyter_client import BlockingKernelClient

    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback: no proxy
    with opener.open(f"{server.url}/api/sessions", timeout=5) as response:
        sessions = json.load(response)
    kernel = next(s["kernel"]["id"] for s in sessions if s["path"].endswith(notebook))
    client = BlockingKernelClient(
        connection_file=str(server.log_path.parent / "runtime" / f"kernel-{kernel}.json"))
    client.load_connection_file()
    client.start_channels()
    printed: list[str] = []
    try:
        client.execute_interactive(code, timeout=timeout_s, output_hook=lambda message: (
            printed.append(message["content"]["text"])
            if message["msg_type"] == "stream" and message["content"]["name"] == "stdout"
            else None))
    finally:
        client.stop_channels()
    return "".join(printed)


def _open_notebook_page(page: Page, server: Server, path: str) -> None:
    # The page loads megabytes of JupyterLab's scripts: slow on a busy machine.
    page.goto(f"{server.url}{path}", timeout=KERNEL_START_TIMEOUT_MS)
    page.locator(".jp-NotebookPanel .jp-Cell").first.wait_for(timeout=KERNEL_START_TIMEOUT_MS)
    wait_for_lab_kernel_idle(page, server=server)


def open_lab_notebook(page: Page, server: Server, name: str = NOTEBOOK_NAME,
                      workspace: str | None = None) -> None:
    """Open a notebook in JupyterLab (in ``workspace``, else the default one) and wait for its
    kernel to be idle."""
    where = f"workspaces/{workspace}/tree" if workspace else "tree"
    _open_notebook_page(page, server, f"/lab/{where}/{name}")


def open_notebook7(page: Page, server: Server, name: str = NOTEBOOK_NAME) -> None:
    """Open a notebook in Notebook 7 (one notebook per page) and wait for its kernel to be
    idle."""
    _open_notebook_page(page, server, f"/notebooks/{name}")


def run_all_cells_in_lab(page: Page, attempts: int = 2) -> None:
    """Run > Run All Cells, through the menu bar as a person would (JupyterLab or Notebook 7).

    Then check that the first cell was queued (its prompt shows [*] or a count at once). A
    click that lands while Lab is still wiring up the kernel can be dropped silently; a
    click that queued nothing is safe to repeat.
    """
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    prompt = page.locator(".jp-NotebookPanel .jp-Cell .jp-InputPrompt").first
    for attempt in range(1, attempts + 1):
        page.locator(".lm-MenuBar-item", has_text=re.compile(r"^Run$")).click()
        page.get_by_role("menuitem", name="Run All Cells", exact=True).click()
        try:
            prompt.filter(has_text=re.compile(r"\[(\*|\d+)\]")).wait_for(timeout=20_000)
            return
        except PlaywrightTimeout:
            if attempt == attempts:
                raise AssertionError(
                    f"Run > Run All Cells did not start the notebook ({attempts} tries)"
                ) from None
            print("Run > Run All Cells queued nothing; clicking it again")


def start_explorer_in_lab(page: Page, server: Server, name: str = NOTEBOOK_NAME,
                          workspace: str | None = None) -> str:
    """Open the explorer notebook, run it, wait for the first heatmap; returns its checksum."""
    open_lab_notebook(page, server, name, workspace)
    run_all_cells_in_lab(page)
    return wait_for_heatmap(page)


def start_explorer_in_notebook7(page: Page, server: Server, name: str = NOTEBOOK_NAME) -> str:
    """Open the explorer notebook in Notebook 7, run it, wait for the first heatmap; returns its
    checksum."""
    open_notebook7(page, server, name)
    run_all_cells_in_lab(page)
    return wait_for_heatmap(page)


def start_explorer_in_voila(page: Page, server: Server) -> str:
    """Load the Voilà page (which runs the notebook) and wait for the first heatmap."""
    # The page loads only once Voilà has run the notebook's cells (a kernel started, torch
    # imported, the model loaded): the page's default limit, meant for an update, is too
    # short for that on a busy machine.
    page.goto(f"{server.url}/", timeout=FIRST_RENDER_TIMEOUT_MS)
    return wait_for_heatmap(page)


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100): always one of the measured values."""
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]
