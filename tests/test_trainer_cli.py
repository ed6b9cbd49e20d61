"""`customdiff train` end to end on the tiny base."""

from __future__ import annotations

import json
import shutil

import pytest
from PIL import Image

from concepts.store import ArtifactStore
from customdiff.__main__ import main
from tests.trainer_helpers import pattern_images


pytestmark = pytest.mark.usefixtures("one_thread")


def test_customdiff_train_stores_an_artifact(tiny_base_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("CUSTOMDIFF_PROGRESS", "1")  # bars on, though stderr is no terminal here
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
    assert "training" in err and "loss=" in err and "lr=8.00e-05" in err  # 1e-5 x (4 + 4) images, the paper's
    assert "class images of 'dog': 100%" in err and "2/2" in err
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


def test_customdiff_train_defaults_to_the_base_resolution(tiny_base_dir, tmp_path, capsys):
    # The tiny base's own size is 64 px (UNet sample_size 8 x VAE factor 8): 128-px photos are plenty,
    # where the former fixed default of 512 refused them (shorter side under 256).
    pattern_images(tmp_path / "toy", size=128)
    # The command of the issue; only the class images are cut to 2 at 2 steps, and the caches kept in tmp_path.
    code = main(["train", "--base", str(tiny_base_dir), "--images", str(tmp_path / "toy"), "--class-prompt", "toy",
                 "--steps", "20", "--out", str(tmp_path / "S"),
                 "--num-class-images", "2", "--class-image-steps", "2", "--work-dir", str(tmp_path / "work"),
                 "--cache-dir", str(tmp_path / "cache"), "--device", "cpu"])
    out, err = capsys.readouterr()
    assert code == 0, err
    concept = ArtifactStore(str(tmp_path / "S")).get_concept(json.loads(out.splitlines()[-1])["digest"])
    assert concept.provenance["steps"] == 20
    assert concept.provenance["hyperparameters"]["resolution"] == 64
    (cached,) = (tmp_path / "cache").glob("*/*")  # class images generated at the base's size too
    assert {Image.open(p).size for p in cached.glob("*.png")} == {(64, 64)}


@pytest.mark.parametrize("sample_size, expected", [(16, 128), (12, "the base's own size 96 px does not fit")])
def test_unset_resolution_is_sample_size_times_vae_factor(tiny_base_dir, tmp_path, sample_size, expected):
    from concepts.errors import InvalidArgument
    from tests.trainer_helpers import job_dict
    from trainer.spec import JobSpec, check_inputs

    base = tmp_path / "base"
    shutil.copytree(tiny_base_dir, base)
    config = json.loads((base / "unet" / "config.json").read_text())
    (base / "unet" / "config.json").write_text(json.dumps({**config, "sample_size": sample_size}))
    data = job_dict(base, tmp_path, pattern_images(tmp_path / "img", size=128))
    del data["hyperparameters"]["resolution"]
    spec = JobSpec.from_dict(data)
    assert spec.hyperparameters.resolution is None
    if isinstance(expected, int):
        assert check_inputs(spec).hyperparameters.resolution == expected  # 16 x 2**(4 VAE blocks - 1)
    else:
        with pytest.raises(InvalidArgument) as e:
            check_inputs(spec)
        assert e.value.field == "hyperparameters.resolution" and expected in e.value.description
