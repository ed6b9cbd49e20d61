"""`customdiff remote` against a running stack (`customdiff serve`, real tritonserver), as a user runs it:
train -> watch -> generate by name -> export -> import into another tenant -> generate."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from customdiff.local import start_serve
from tests.trainer_helpers import stripes_png


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_base_dir):
    proc, ports = start_serve(tmp_path_factory.mktemp("remote"), api_keys="key-a=tenant-a,key-b=tenant-b",
                              base_model=str(tiny_base_dir))
    yield [f"--{s}=127.0.0.1:{ports[s]}" for s in ("trainer", "merger", "inference")]
    proc.terminate()
    assert proc.wait(timeout=120) == 0


def remote(server: list[str], key: str, *args: str, code: int = 0) -> list[dict]:
    """Run `customdiff remote`; its JSON lines."""
    env = dict(os.environ, MY_KEY=key)
    out = subprocess.run([sys.executable, "-m", "customdiff", "remote", *server, "--api-key-env", "MY_KEY", *args],
                         capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == code, out.stderr[-3000:]
    return [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")] if code == 0 else \
        [{"stderr": out.stderr}]


def pixels(path: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(open(path, "rb").read())), dtype=np.int16)


def test_train_watch_generate_export_import_generate(server, tmp_path):
    images = []
    for seed in (0, 3):
        images.append(tmp_path / f"stripes{seed}.png")
        images[-1].write_bytes(stripes_png(seed))
    lines = remote(server, "key-a", "train", "--name", "stripes", "--class-prompt", "dog", "--steps", "4",
                   "--resolution", "64", "--num-class-images", "1", "--images", *map(str, images))
    job = lines[-1]
    assert job["state"] == "JOB_STATE_SUCCEEDED" and job["concept"]["name"] == "stripes"
    assert max(int(line.get("training_job", {}).get("progress", {}).get("step", 0)) for line in lines[:-1]) == 4
    # The job afterwards: listed, got, watched (its last event is its end).
    assert job["name"] in [j["name"] for j in remote(server, "key-a", "jobs", "list", "--kind", "training")]
    assert remote(server, "key-a", "jobs", "get", job["name"])[0]["state"] == "JOB_STATE_SUCCEEDED"
    assert remote(server, "key-a", "jobs", "watch", job["name"])[-1]["training_job"]["state"] == "JOB_STATE_SUCCEEDED"
    # Generate by name, export, import into tenant B, generate there: the same images.
    prompt = ["photo of a <new1> dog", "--steps", "3", "--seed", "5"]
    (a_image,) = remote(server, "key-a", "generate", *prompt, "--concept", "stripes", "--out", str(tmp_path / "a"))
    exported = remote(server, "key-a", "concepts", "export", "stripes", "--out", str(tmp_path / "export"))
    assert {os.path.basename(f["file"]) for f in exported} >= {"pytorch_custom_diffusion_weights.safetensors"}
    imported = remote(server, "key-b", "concepts", "import", str(tmp_path / "export"), "--name", "copied")[0]
    assert imported["name"] == "copied" and imported["version"] == 1
    (b_image,) = remote(server, "key-b", "generate", *prompt, "--concept", "copied", "--out", str(tmp_path / "b"))
    assert np.abs(pixels(a_image["file"]) - pixels(b_image["file"])).max() <= 1
    # Tenant B sees its copy only; A's concept is NOT_FOUND to B, with the field's words on stderr.
    assert [c["name"] for c in remote(server, "key-b", "concepts", "list")] == ["copied"]
    (failed,) = remote(server, "key-b", "generate", *prompt, "--concept", "stripes", "--out", str(tmp_path / "c"),
                       code=1)
    assert failed["stderr"].startswith("customdiff remote: NOT_FOUND: ")


def test_the_key_comes_from_the_environment_only(server):
    out = subprocess.run([sys.executable, "-m", "customdiff", "remote", *server, "--api-key-env", "NOT_SET_HERE",
                          "concepts", "list"], capture_output=True, text=True, timeout=120,
                         env={k: v for k, v in os.environ.items() if k != "NOT_SET_HERE"})
    assert out.returncode == 2 and "set $NOT_SET_HERE to your API key" in out.stderr
