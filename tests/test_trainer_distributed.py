"""`python -m trainer` as launchers run it: alone, under torchrun with 2 CPU processes (gloo), and failing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from concepts.store import ArtifactStore
from tests.trainer_helpers import job_dict, pattern_images

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def _launch(args: list[str], spec: dict, path: Path) -> subprocess.CompletedProcess:
    path.write_text(json.dumps(spec))
    return subprocess.run([sys.executable, *args, "-m", "trainer", "--spec", str(path)], env=ENV,
                          capture_output=True, text=True, timeout=600, check=False)


def _artifact(root: Path):
    digest = json.loads((root / "work" / "result.json").read_text())["digest"]
    return ArtifactStore(str(root / "store")).get_concept(digest)


def _events(work: Path) -> list[dict]:
    return [json.loads(line) for line in (work / "progress.jsonl").read_text().splitlines()]


def test_two_gloo_processes_end_with_the_weights_of_one_process(tiny_base_dir, tmp_path):
    images = pattern_images(tmp_path / "img")
    cache = str(tmp_path / "class-images")
    hp = {"max_train_steps": 4, "learning_rate": 1e-4}
    two = job_dict(tiny_base_dir, tmp_path / "two", images, {**hp, "train_batch_size": 1}, class_image_cache_dir=cache)
    torchrun = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    run = _launch(torchrun, two, tmp_path / "two.json")
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    # Both ranks generated one of the two class images; the single process reuses them.
    one = job_dict(tiny_base_dir, tmp_path / "one", images, {**hp, "train_batch_size": 2}, class_image_cache_dir=cache)
    run = _launch([], one, tmp_path / "one.json")
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert json.loads(run.stdout.splitlines()[-1])["event"] == "done"

    a, b = (_artifact(tmp_path / name) for name in ("one", "two"))
    assert (a.provenance["world_size"], b.provenance["world_size"]) == (1, 2)
    biggest = max(d.dense.abs().max().item() for d in a.deltas.values())
    assert biggest > 1e-3  # the weights did move (4 steps of about lr = 4e-4)
    # Summation order differs between one process and a gloo all-reduce; AdamW's normalization
    # turns that float noise into differences far below one step's update (1e-5 vs 4e-4).
    for name, delta in a.deltas.items():
        torch.testing.assert_close(b.deltas[name].dense, delta.dense, rtol=1e-3, atol=1e-5)
    torch.testing.assert_close(b.embeddings, a.embeddings, rtol=1e-3, atol=1e-5)
    # Rank 0 alone reports progress; both runs report the same global loss.
    two_loss = [e["loss"] for e in _events(tmp_path / "two" / "work") if e["event"] == "progress"]
    one_loss = [e["loss"] for e in _events(tmp_path / "one" / "work") if e["event"] == "progress"]
    assert len(two_loss) == len(one_loss) == 4
    assert all(abs(x - y) < 1e-4 for x, y in zip(two_loss, one_loss)), (two_loss, one_loss)


def test_bad_input_fails_before_compute_with_the_reason(tiny_base_dir, tmp_path):
    images = pattern_images(tmp_path / "img")
    broken = tmp_path / "img" / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    spec = job_dict(tiny_base_dir, tmp_path, images + [str(broken)])
    run = _launch([], spec, tmp_path / "spec.json")
    assert run.returncode == 2
    last = _events(tmp_path / "work")[-1]
    assert last["event"] == "error"
    assert last["message"].startswith(f"concepts[0].images[3]: {broken} is not a readable image (")
    assert json.loads(run.stdout.splitlines()[-1]) == last
    assert len(_events(tmp_path / "work")) == 1  # nothing ran before the check
    (tmp_path / "bad.json").write_text("{not json")
    run = subprocess.run([sys.executable, "-m", "trainer", "--spec", str(tmp_path / "bad.json")], env=ENV,
                         capture_output=True, text=True, timeout=120, check=False)
    assert run.returncode == 2
    message = json.loads(run.stdout.splitlines()[-1])["message"]
    assert message.startswith(f"spec: cannot read job spec {tmp_path / 'bad.json'}: ")
