"""`customdiff train` end to end on the tiny base."""

from __future__ import annotations

import json

import pytest
import torch

from concepts.store import ArtifactStore
from customdiff.__main__ import main
from tests.trainer_helpers import pattern_images


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_customdiff_train_stores_an_artifact(tiny_base_dir, tmp_path, capsys):
    pattern_images(tmp_path / "stripes")
    code = main(["train", "--base", str(tiny_base_dir), "--images", str(tmp_path / "stripes"), "--class-prompt", "dog",
                 "--steps", "3", "--out", str(tmp_path / "store"), "--resolution", "64", "--num-class-images", "2",
                 "--class-image-steps", "2", "--work-dir", str(tmp_path / "work"), "--cache-dir", str(tmp_path / "cache"),
                 "--device", "cpu"])
    out, err = capsys.readouterr()
    assert code == 0, err
    summary = json.loads(out.splitlines()[-1])
    concept = ArtifactStore(str(tmp_path / "store")).get_concept(summary["digest"])
    assert concept.tokens == ("<new1>",) and concept.class_words == ("dog",)
    assert concept.provenance["steps"] == 3 and concept.provenance["concept_name"] == "stripes"
    assert "training" in err and "loss=" in err and "lr=4.00e-05" in err  # postfix; 1e-5 x batch 2 x 2 (prior)
    assert json.loads((tmp_path / "work" / "result.json").read_text())["digest"] == summary["digest"]


def test_customdiff_train_rejects_bad_input_before_compute(tiny_base_dir, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    code = main(["train", "--base", str(tiny_base_dir), "--images", str(tmp_path / "empty"), "--class-prompt", "dog",
                 "--out", str(tmp_path / "store")])
    assert code == 2
    assert capsys.readouterr().err.strip().endswith(f"customdiff train: error: --images: {tmp_path / 'empty'} holds no files")
    pattern_images(tmp_path / "img")
    code = main(["train", "--base", str(tiny_base_dir), "--images", str(tmp_path / "img"), "--class-prompt", "dog",
                 "--out", str(tmp_path / "store"), "--steps", "0", "--work-dir", str(tmp_path / "w")])
    assert code == 2
    assert "hyperparameters.max_train_steps: must be between 1 and 20000, got 0" in capsys.readouterr().err
