"""Fixtures for the real-browser tests: JupyterLab 4, Notebook 7, Voilà and a headless system
Chromium.

    .venv/bin/python -m pytest tests/browser        # or: -m browser / -m "not browser"

These tests need Debian's /usr/bin/chromium and the Python packages playwright, jupyterlab,
notebook (7), voila and nbformat. In CI they must run, so a missing piece fails loudly; set
PULLBACK_SKIP_BROWSER=1 to skip them on purpose. PULLBACK_BROWSER_MODULE (see harness.py)
points the notebook at a stand-in module instead of pullback_widgets.

Screenshots, including one of the page whenever a test fails, go to artifacts/screenshots/.
"""

from __future__ import annotations

import functools
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from . import harness

if TYPE_CHECKING:
    from playwright.sync_api import Browser, Page


def pytest_configure(config: pytest.Config) -> None:
    # Registered here rather than in pyproject.toml so this folder is self-contained.
    config.addinivalue_line(
        "markers", "browser: drives a real Chromium against JupyterLab/Notebook 7/Voilà servers"
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if os.environ.get("PULLBACK_SKIP_BROWSER") != "1":
        return
    skip = pytest.mark.skip(reason="PULLBACK_SKIP_BROWSER=1 is set")
    for item in items:
        if "browser" in item.keywords:
            item.add_marker(skip)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):
    """When a browser test fails, keep a screenshot and show the browser console's errors."""
    report = yield
    if report.when == "call" and report.failed:
        for value in getattr(item, "funcargs", {}).values():
            page = getattr(value, "page", None)
            if page is None:
                continue
            try:
                path = harness.save_screenshot(page, f"FAILED-{item.name}")
                report.sections.append(("browser screenshot", str(path)))
            except Exception as exc:  # a crashed page must not hide the real failure
                report.sections.append(("browser screenshot", f"could not be taken: {exc}"))
            console = harness.console_messages(page)
            if console:
                report.sections.append(("browser console", "\n".join(console[-40:])))
    return report


@pytest.fixture(scope="session")
def browser_workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("browser")


@pytest.fixture(scope="session")
def notebook_root(browser_workdir: Path) -> Path:
    """The servers' root folder, holding the explorer notebook."""
    root = browser_workdir / "notebooks"
    harness.write_explorer_notebook(root / harness.NOTEBOOK_NAME)
    return root


def _serve(request: pytest.FixtureRequest, start, *args) -> Iterator[harness.Server]:
    try:
        server = start(*args)
    except harness.ServerError as exc:
        pytest.fail(str(exc), pytrace=False)
    try:
        yield server
    finally:
        server.stop()
        # The kernel's traceback lands in the server log, not in the page: show it on failure.
        if request.session.testsfailed:
            print(f"\n--- {server.name} log tail ({server.log_path}) ---\n{server.log_tail()}")


@pytest.fixture(scope="session")
def jupyterlab_server(
    request: pytest.FixtureRequest, notebook_root: Path, browser_workdir: Path
) -> Iterator[harness.Server]:
    yield from _serve(
        request, harness.start_jupyterlab, notebook_root, browser_workdir / "jupyterlab"
    )


@pytest.fixture(scope="session")
def notebook7_server(
    request: pytest.FixtureRequest, notebook_root: Path, browser_workdir: Path
) -> Iterator[harness.Server]:
    yield from _serve(
        request, harness.start_notebook7, notebook_root, browser_workdir / "notebook7"
    )


@pytest.fixture(scope="session")
def voila_server(
    request: pytest.FixtureRequest, notebook_root: Path, browser_workdir: Path
) -> Iterator[harness.Server]:
    yield from _serve(
        request,
        harness.start_voila,
        notebook_root / harness.NOTEBOOK_NAME,
        browser_workdir / "voila",
    )


@pytest.fixture(scope="session")
def browser() -> Iterator[Browser]:
    try:
        playwright = harness.start_playwright()
    except RuntimeError as exc:
        pytest.fail(str(exc), pytrace=False)
    try:
        try:
            chromium = harness.launch_chromium(playwright)
        except RuntimeError as exc:
            pytest.fail(str(exc), pytrace=False)
        yield chromium
        chromium.close()
    finally:
        playwright.stop()


class ExplorerPage:
    """A browser page on which the explorer has rendered, with the heatmap's first checksum."""

    def __init__(self, page: Page, first_checksum: str) -> None:
        self.page = page
        self.first_checksum = first_checksum


def _explorer_page(browser: Browser, name: str, start, server) -> Iterator[ExplorerPage]:
    page = harness.new_page(browser)
    try:
        try:
            first = start(page, server)
        except Exception:
            # The setup failed before any test could run: keep what the page showed.
            path = harness.save_screenshot(page, f"FAILED-{name}-setup")
            console = "\n".join(harness.console_messages(page)[-40:]) or "(none)"
            print(f"screenshot: {path}\nbrowser console:\n{console}")
            raise
        yield ExplorerPage(page, first)
    finally:
        harness.close_page(page)


def _module_notebook(request: pytest.FixtureRequest, notebook_root: Path) -> tuple[str, str]:
    """(module name, notebook name): a copy of the explorer notebook for the requesting module.

    Each test module gets a copy of its own, hence a kernel of its own: a page that reconnected
    to the kernel an earlier module's page had run the explorer in lost its widget messages
    ("Unknown subshell_id" in the kernel's log) and never drew a heatmap."""
    module = request.module.__name__.rsplit(".", 1)[-1]
    name = f"explorer-{module}.ipynb"
    shutil.copyfile(notebook_root / harness.NOTEBOOK_NAME, notebook_root / name)
    return module, name


@pytest.fixture(scope="module")
def lab_explorer(request: pytest.FixtureRequest, browser: Browser,
                 jupyterlab_server: harness.Server, notebook_root: Path
                 ) -> Iterator[ExplorerPage]:
    """The explorer notebook opened in JupyterLab, in a workspace of the module's own, and run
    (Run > Run All Cells)."""
    module, name = _module_notebook(request, notebook_root)
    yield from _explorer_page(
        browser, "jupyterlab",
        functools.partial(harness.start_explorer_in_lab, name=name, workspace=module),
        jupyterlab_server)


@pytest.fixture(scope="module")
def notebook7_explorer(request: pytest.FixtureRequest, browser: Browser,
                       notebook7_server: harness.Server, notebook_root: Path
                       ) -> Iterator[ExplorerPage]:
    """The explorer notebook opened in Notebook 7 and run (Run > Run All Cells)."""
    _, name = _module_notebook(request, notebook_root)
    yield from _explorer_page(
        browser, "notebook7",
        functools.partial(harness.start_explorer_in_notebook7, name=name),
        notebook7_server)


@pytest.fixture(scope="module")
def voila_explorer(browser: Browser, voila_server: harness.Server) -> Iterator[ExplorerPage]:
    """The explorer notebook rendered by Voilà."""
    yield from _explorer_page(browser, "voila", harness.start_explorer_in_voila, voila_server)
