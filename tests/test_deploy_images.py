"""Static checks of deploy/docker: pinned bases, multi-stage, non-root, nothing but packages fetched.

The images themselves are built by `docker build` (docs/deploy.md), which this machine cannot run.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

DOCKER = Path(__file__).resolve().parents[1] / "deploy" / "docker"
DOCKERFILES = ["Dockerfile.services", "Dockerfile.trainer", "Dockerfile.triton"]


def base_images(text: str) -> list[str]:
    """The FROM images with ARG defaults substituted; stage names (FROM build) are left out."""
    args = dict(re.findall(r"^ARG\s+(\w+)=(\S+)", text, flags=re.MULTILINE))
    stages = set(re.findall(r"^FROM\s+\S+\s+AS\s+(\w+)", text, flags=re.MULTILINE | re.IGNORECASE))
    images = []
    for image in re.findall(r"^FROM\s+(\S+)", text, flags=re.MULTILINE):
        image = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], image)
        if image not in stages:
            images.append(image)
    return images


@pytest.mark.parametrize("name", DOCKERFILES)
def test_dockerfiles_are_pinned_multi_stage_and_non_root(name):
    text = (DOCKER / name).read_text()
    images = base_images(text)
    assert len(images) >= 2, f"{name}: expected a build stage and a runtime stage, got {images}"
    for image in images:
        assert re.search(r":[\w.-]*\d[\w.-]*$|@sha256:[0-9a-f]{64}$", image) and "latest" not in image, image
    assert re.findall(r"^USER\s+(\S+)", text, flags=re.MULTILINE)[-1] == "1000:1000"
    assert "--mount" not in text and not re.search(r"curl|wget|huggingface-cli|snapshot_download", text)
    installs = re.findall(r"pip install [^\n]*", text)
    assert installs and all("-c /tmp/constraints.txt" in line for line in installs), installs


def test_constraints_pin_every_package_exactly():
    lines = [l for l in (DOCKER / "constraints.txt").read_text().splitlines() if l and not l.startswith("#")]
    assert all(re.fullmatch(r"[A-Za-z0-9_.-]+==[\w.]+", line) for line in lines), lines
    assert "torch==2.13.0" in lines and "nvidia-pytriton==0.7.0" in lines


def test_build_contexts_leave_local_state_out():
    ignores = [(DOCKER / f"{name}.dockerignore").read_text() for name in DOCKERFILES]
    assert ignores[0] == ignores[1] == ignores[2]
    assert {".git", ".venv", ".tools", "proto/gen", "customdiff-data"} <= set(ignores[0].splitlines())
