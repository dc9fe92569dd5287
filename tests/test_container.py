"""Apptainer.def and its lock file, checked as far as a machine without Apptainer allows:
the definition's structure, its %files, the pins of containers/requirements.lock, a pip
resolution of the lock, and the %test smoke commands run on the host."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib", reason="Python >= 3.11 reads pyproject.toml")

REPO = Path(__file__).resolve().parents[1]
DEF = REPO / "Apptainer.def"
LOCK = REPO / "containers" / "requirements.lock"
SECTIONS = {"%labels", "%files", "%post", "%environment", "%runscript", "%test"}


def parse_def(text: str) -> tuple[dict[str, str], dict[str, list[str]]]:
    """(header keys, section name -> body lines) of an Apptainer definition file."""
    header: dict[str, str] = {}
    sections: dict[str, list[str]] = {}
    current = None
    for line in text.splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        if line.startswith("%"):
            current = line.split()[0]
            assert current not in sections, f"section {current} twice"
            sections[current] = []
        elif current is None:
            key, _, value = line.partition(":")
            header[key.strip()] = value.strip()
        else:
            sections[current].append(line.strip())
    return header, sections


def project() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]


def test_definition_has_a_pinned_base_every_section_and_existing_files():
    header, sections = parse_def(DEF.read_text())
    assert header["Bootstrap"] == "docker"
    assert ":" in header["From"] and not header["From"].endswith(":latest")
    assert set(sections) == SECTIONS
    for line in sections["%files"]:
        source = line.split()[0]
        assert (REPO / source).exists(), f"%files source {source} missing"
    labels = dict(line.split(None, 1) for line in sections["%labels"])
    assert labels["org.opencontainers.image.version"] == project()["version"]
    assert sections["%runscript"] == ['exec synthbreast "$@"']
    post = " ".join(sections["%post"])
    assert "requirements.lock" in post and "--no-deps" in post


def test_lock_pins_every_runtime_dependency_to_an_allowed_version():
    from packaging.requirements import Requirement

    lines = [x for x in LOCK.read_text().splitlines() if x.strip() and not x.startswith("#")]
    pins = {}
    for line in lines:
        name, sep, version = line.partition("==")
        assert sep and version, f"not pinned: {line}"
        pins[re.sub(r"[-_.]+", "-", name).lower()] = version
    for spec in project()["dependencies"]:
        req = Requirement(spec)
        name = re.sub(r"[-_.]+", "-", req.name).lower()
        assert name in pins, f"{req.name} missing from the lock"
        assert req.specifier.contains(pins[name]), f"{name}=={pins[name]} violates {spec}"


@pytest.mark.slow
def test_lock_resolves_with_pip(tmp_path):
    # a resolution of exactly these pins (no install: torch alone is several GB)
    done = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet",
         "--report", str(tmp_path / "report.json"), "-r", str(LOCK)],
        capture_output=True, text=True,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.mark.slow
def test_the_test_section_runs_on_the_host(tmp_path):
    _, sections = parse_def(DEF.read_text())
    script = tmp_path / "test.sh"
    script.write_text("\n".join(sections["%test"]) + "\n")
    bin_dir = str(Path(sys.executable).parent)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "TMPDIR": str(tmp_path)}
    done = subprocess.run(["bash", str(script)], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert "torch" in done.stdout
