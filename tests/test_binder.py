"""binder/ stays in step with pyproject.toml: Binder must build the environment the package
declares, with CPU-only torch (from the PyTorch CPU index alone) and ipywidgets 8 (Binder's base
image has 7), and postBuild must install the package and prefetch the paper models' weights
without failing the build when offline. Every link to the project names the repository of
pyproject's [project.urls]."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import urllib.parse
from pathlib import Path

import pytest
from packaging.requirements import InvalidRequirement, Requirement
from packaging.utils import canonicalize_name

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    tomllib = pytest.importorskip("tomli")

ROOT = Path(__file__).resolve().parents[1]
BINDER = ROOT / "binder"
# The extras Binder needs besides the runtime: JupyterLab for the notebooks, Voilà for the app.
BINDER_EXTRAS = ("lab",)
PAPER_MODELS = ("resnet50", "vgg11_bn", "densenet121")


def _pyproject() -> dict:
    with open(ROOT / "pyproject.toml", "rb") as f:
        return tomllib.load(f)


CPU_INDEX = "https://download.pytorch.org/whl/cpu"
# What requirements.txt installs, before anything that depends on torch can pull a CUDA build.
TORCH_PACKAGES = ("torch", "torchvision")


def _binder_requirements() -> tuple[dict[str, Requirement], list[str]]:
    """(requirements by canonical name, pip options) of binder/requirements.txt."""
    requirements: dict[str, Requirement] = {}
    options: list[str] = []
    for raw in (BINDER / "requirements.txt").read_text().splitlines():
        line = raw.split(" #", 1)[0].strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("-"):  # pip options such as --index-url
            options.append(" ".join(line.replace("=", " ", 1).split()))
            continue
        try:
            requirement = Requirement(line)
        except InvalidRequirement as error:
            pytest.fail(f"binder/requirements.txt: {raw!r} is not a requirement: {error}")
        name = canonicalize_name(requirement.name)
        assert name not in requirements, f"{requirement.name} is listed twice"
        requirements[name] = requirement
    return requirements, options


def _declared(name: str) -> Requirement:
    dependencies = [Requirement(r) for r in _pyproject()["project"]["dependencies"]]
    return next(r for r in dependencies if canonicalize_name(r.name) == name)


def test_requirements_install_torch_from_the_cpu_index_only():
    requirements, options = _binder_requirements()
    # --index-url replaces PyPI: no CUDA build of torch is even a candidate. An
    # --extra-index-url would let pip pick from both.
    assert options == [f"--index-url {CPU_INDEX}"], options
    assert sorted(requirements) == sorted(TORCH_PACKAGES), "the rest comes from postBuild"
    for name, listed in requirements.items():
        declared = _declared(name)
        assert listed.specifier == declared.specifier, f"{listed} differs from {declared}"


def test_post_build_installs_the_lab_extra_from_pypi():
    text = (BINDER / "postBuild").read_text()
    extras = ",".join(BINDER_EXTRAS)
    assert f'python -m pip install --no-cache-dir -e ".[{extras}]"' in text
    assert "index-url" not in text  # PyPI, where torch is already satisfied
    for extra in BINDER_EXTRAS:
        assert extra in _pyproject()["project"]["optional-dependencies"]
    # Binder's base image ships ipywidgets 7; the package's own requirement replaces it.
    ipywidgets = _declared("ipywidgets")
    assert not ipywidgets.specifier.contains("7.8.5"), ipywidgets


def test_post_build_installs_the_package_and_prefetches():
    post_build = BINDER / "postBuild"
    text = post_build.read_text()
    assert text.startswith("#!/usr/bin/env bash\n")
    if os.name == "posix":
        assert os.access(post_build, os.X_OK), "git add --chmod=+x binder/postBuild"
    assert "set -euo pipefail" in text
    assert text.index("pip install") < text.index("binder/prefetch_weights.py")
    assert "binder/prefetch_weights.py" in text


def test_prefetch_covers_the_paper_models():
    from pullback_widgets.models import MODELS

    text = (BINDER / "prefetch_weights.py").read_text()
    for name in PAPER_MODELS:
        assert name in MODELS
        assert f'"{name}"' in text


def test_prefetch_tolerates_being_offline(tmp_path):
    # Every download goes to a proxy port where nobody listens: offline, but failing at once.
    # The port stays bound (never listening) until the script ends: one closed again at once
    # could be taken meanwhile by another process of a shared machine, which would answer.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as closed:
        closed.bind(("127.0.0.1", 0))
        proxy = f"http://127.0.0.1:{closed.getsockname()[1]}"
        env = dict(os.environ, TORCH_HOME=str(tmp_path / "torch"), http_proxy=proxy,
                   https_proxy=proxy, HTTP_PROXY=proxy, HTTPS_PROXY=proxy)
        env.pop("no_proxy", None)
        env.pop("NO_PROXY", None)
        # Long, against a hang only: the script imports torch, slow on a loaded machine.
        result = subprocess.run([sys.executable, str(BINDER / "prefetch_weights.py")], env=env,
                                capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "could not fetch resnet50, vgg11_bn, densenet121" in result.stderr
    assert "The build goes on" in result.stderr


# A link to a GitHub repository, or a Binder link that builds one: owner/name.
REPOSITORY_LINK = re.compile(
    r"(?:github\.com|mybinder\.org/v2/gh)/([\w.-]+/[\w.-]+?)(?:\.git)?(?=[/?#)\s\"'<]|$)")


def _documents() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")),
            *sorted(BINDER.iterdir()), *sorted((ROOT / "notebooks").glob("*.ipynb")),
            *sorted((ROOT / "pullback_widgets").rglob("*.py"))]


def test_every_link_to_the_project_names_its_repository():
    urls = _pyproject()["project"]["urls"]
    repository = urls["Repository"]
    assert re.fullmatch(r"https://github\.com/[\w.-]+/[\w.-]+", repository), repository
    ours = repository.removeprefix("https://github.com/")
    for label, url in urls.items():
        for named in REPOSITORY_LINK.findall(url):
            assert named == ours, f"[project.urls] {label} = {url}"
    readme = (ROOT / "README.md").read_text()
    badge = re.search(r"\(https://mybinder\.org/v2/gh/([\w.-]+/[\w.-]+)/HEAD\?labpath=([^)\s]+)\)",
                      readme)
    assert badge, "the README's Binder badge"
    assert badge.group(1) == ours
    assert (ROOT / urllib.parse.unquote(badge.group(2))).is_file(), badge.group(2)
    problems = []
    for path in _documents():
        for named in REPOSITORY_LINK.findall(path.read_text()):
            # Links to other projects (a library we cite) are fine; ours must agree.
            if "pullback" in named.lower() and named != ours:
                problems.append(f"{path.relative_to(ROOT)}: {named}")
    assert not problems, f"links disagree with {repository}: {problems}"
