"""Progress bars (rank 0, terminal only, CUSTOMDIFF_PROGRESS to force), the class-image bar, and the
top-level `customdiff --help` and `--version`."""

from __future__ import annotations

import importlib.metadata
import io

import pytest
import torch

from concepts.base import load_base
from concepts.progress import PROGRESS_ENV, StageBar, bars_enabled, progress_bar
from customdiff.__main__ import build_parser, main, package_version
from trainer.class_images import generate_class_images
from trainer.distributed import DistContext


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture(autouse=True)
def no_forcing(monkeypatch):
    monkeypatch.delenv(PROGRESS_ENV, raising=False)
    monkeypatch.delenv("RANK", raising=False)


@pytest.mark.parametrize("env, rank, stream, shown", [
    ({}, None, _Terminal(), True),                       # a terminal, rank 0
    ({}, None, io.StringIO(), False),                    # a pipe or a log file
    ({PROGRESS_ENV: "1"}, None, io.StringIO(), True),    # forced on
    ({PROGRESS_ENV: "0"}, None, _Terminal(), False),     # forced off
    ({}, 1, _Terminal(), False),                         # not the main rank
    ({PROGRESS_ENV: "1", "RANK": "2"}, None, _Terminal(), False),  # torchrun's RANK, even when forced
])
def test_bars_show_on_a_terminal_on_rank_0_only(monkeypatch, env, rank, stream, shown):
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert bars_enabled(rank, stream) is shown


def test_bars_are_disabled_when_stderr_is_not_a_terminal(capsys):
    with progress_bar(total=3, desc="quiet") as bar:
        bar.update(3)
    assert bar.disable
    with StageBar("quiet too", ("a", "b")) as stages:
        stages.next()
    assert stages.bar.disable
    assert capsys.readouterr().err == ""


def test_a_stage_bar_names_each_stage(monkeypatch, capsys):
    monkeypatch.setenv(PROGRESS_ENV, "1")
    with StageBar("merge", ("loading", "merging")) as stages:
        stages.next()
        stages.next()
    err = capsys.readouterr().err
    assert "merge:" in err and "loading" in err and "2/2" in err


def test_the_class_image_bar_reaches_its_total(tiny_base_dir, tmp_path, monkeypatch, capsys, one_thread):
    monkeypatch.setenv(PROGRESS_ENV, "1")
    ctx = DistContext(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    paths = generate_class_images(load_base(tiny_base_dir), "toy", 5, tmp_path / "class", steps=2, resolution=64,
                                  ctx=ctx, progress=True)
    assert all(p.exists() for p in paths)
    frames = capsys.readouterr().err.split("\r")
    counts = [f.split("|")[2].split()[0] for f in frames if f.startswith("class images of 'toy'")]
    assert counts[0] == "0/5" and counts[-1] == "5/5", frames  # the bar moved, not stuck at 0
    # Nothing missing: no generation, no bar.
    generate_class_images(None, "toy", 5, tmp_path / "class", steps=2, resolution=64, ctx=ctx, progress=True)
    assert capsys.readouterr().err == ""


def test_help_describes_customdiff_and_every_command(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert "Custom Diffusion" in out and "README.md" in out and "docs/job-spec.md" in out
    assert "argparse" not in out  # the module docstring is for developers
    (sub,) = [a for a in build_parser()._actions if a.dest == "command"]
    named = {"serve", "train", "merge", "generate", "export-onnx", "import", "eval", "demo", "base"}
    assert named <= set(sub.choices)
    missing = [name for name in sub.choices if f"\n    {name} " not in out]
    assert not missing, out


def test_version_prints_the_installed_version(capsys, monkeypatch):
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out == f"customdiff {importlib.metadata.version('customdiff')}\n"

    def not_installed(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "version", not_installed)
    assert package_version() == "unknown"
