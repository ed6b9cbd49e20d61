"""Data: EXIF, crop, the zoom augmentation with masks and captions, batch draws, loss and lr scaling."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from trainer.batches import BatchMaker, EncodedExamples
from trainer.data import augmented_view, center_square, instance_examples, load_image, paste_mask
from trainer.loop import batch_plan, diffusion_loss, learning_rate
from trainer.spec import Hyperparameters


def test_exif_orientation_is_applied(tmp_path):
    a = np.zeros((20, 40, 3), np.uint8)
    a[:, :20] = 255  # left half white
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    Image.fromarray(a).save(tmp_path / "r.jpg", exif=exif, quality=95)
    image = load_image(tmp_path / "r.jpg")
    assert image.size == (20, 40)
    pixels = np.asarray(image)
    assert pixels[:15].mean() > 200 and pixels[25:].mean() < 50  # the white half is now on top


def test_center_square_keeps_the_middle():
    a = np.zeros((32, 96, 3), np.uint8)
    a[:, 32:64] = 200
    square = np.asarray(center_square(Image.fromarray(a), 16))
    assert square.shape == (16, 16, 3) and square.min() >= 190


def test_zoom_augmentation_masks_and_captions():
    image = Image.fromarray(np.full((64, 64, 3), 255, np.uint8))
    rng = np.random.default_rng(0)
    views = [augmented_view(image, "photo of a <new1> dog", 64, 8, rng, augment=True, hflip=True) for _ in range(400)]
    zoom_out = [v for v in views if v.mask.sum() < 64]
    zoom_in = [v for v in views if v.caption.startswith(("zoomed in ", "close up "))]
    assert 0.55 < len(zoom_out) / len(views) < 0.75  # the reference's 0.66
    assert all(v.mask.sum() == 64 and v.pixels.min() == 1.0 for v in zoom_in)  # a crop of the white image
    for v in zoom_out:
        white = v.pixels[0] > 0.5
        assert v.mask.sum() >= 1
        # Every masked latent cell lies inside the pasted (white) square; outside is mid-gray canvas.
        for r, c in zip(*np.nonzero(v.mask)):
            assert white[r * 8:(r + 1) * 8, c * 8:(c + 1) * 8].all()
        assert (v.pixels[:, ~white] == 0).all()
        small = white.sum() < (0.6 * 64) ** 2
        assert v.caption.startswith(("a far away ", "very small ")) == small
    assert {v.caption.split(" <new1>")[0] for v in views} == {
        "photo of a", "a far away photo of a", "very small photo of a", "zoomed in photo of a", "close up photo of a"}


def test_paste_mask_trims_one_cell_like_the_reference_and_never_empties():
    mask = paste_mask(top=0, left=0, scale=170, size=512, factor=8)
    assert mask[1:20, 1:20].all() and mask.sum() == 19 * 19
    assert paste_mask(top=3, left=5, scale=21, size=64, factor=8).sum() == 1


def test_views_are_reproducible_per_image():
    images = [(Image.fromarray(np.random.default_rng(i).integers(0, 255, (64, 64, 3), dtype=np.uint8)), "a") for i in range(2)]
    first = list(instance_examples(images, 64, 8, 3, seed=7, augment=True, hflip=True))
    again = list(instance_examples(images, 64, 8, 3, seed=7, augment=True, hflip=True))
    assert len(first) == 6
    assert all(np.array_equal(a.pixels, b.pixels) and a.caption == b.caption for a, b in zip(first, again))


def _encoded(n_sources: int, per_source: int, offset: float) -> EncodedExamples:
    n = n_sources * per_source
    mean = torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1).expand(n, 4, 2, 2) + offset
    return EncodedExamples(mean=mean.contiguous(), std=torch.full((n, 4, 2, 2), 0.1), mask=torch.ones(n, 1, 2, 2),
                           caption_index=torch.arange(n) % 2, captions=["a", "b"], per_source=per_source)


def test_ranks_slice_the_same_global_batch():
    class_states = torch.randn(2, 2, 8)

    def maker(rank: int, world: int) -> BatchMaker:
        return BatchMaker(_encoded(3, 4, 0.0), torch.tensor([[1, 2], [3, 4]]), _encoded(5, 2, 100.0),
                          class_states, seed=1, global_batch=4, rank=rank, world_size=world,
                          scaling_factor=0.5, num_train_timesteps=1000)

    whole = maker(0, 1).make(3)
    parts = [maker(r, 2).make(3) for r in range(2)]
    # One process sees [inst 0..3, class 0..3]; rank r sees [inst 2r, 2r+1, class 2r, 2r+1].
    order = [0, 1, 4, 5, 2, 3, 6, 7]
    for name in ("latents", "noise", "timesteps"):
        torch.testing.assert_close(torch.cat([getattr(p, name) for p in parts]), getattr(whole, name)[order], rtol=0, atol=0)
    torch.testing.assert_close(torch.cat([p.class_states for p in parts]), whole.class_states, rtol=0, atol=0)
    torch.testing.assert_close(torch.cat([p.instance_ids for p in parts]), whole.instance_ids, rtol=0, atol=0)
    assert not torch.equal(maker(0, 1).make(4).noise, whole.noise)


def test_epochs_visit_every_example_once():
    m = BatchMaker(_encoded(3, 1, 0.0), torch.zeros(2, 2, dtype=torch.long), _encoded(5, 1, 100.0), torch.zeros(2, 2, 8),
                   seed=0, global_batch=5, rank=0, world_size=1, scaling_factor=1.0, num_train_timesteps=10)
    assert sorted(m._indices(0).tolist()) == [0, 1, 2, 3, 4]


def test_masked_loss_averages_over_masked_elements():
    pred = torch.zeros(3, 4, 2, 2)
    target = torch.ones(3, 4, 2, 2)
    target[0, :, 0, 0] = 3.0  # squared error 9 in the masked cell of example 0, 1 elsewhere
    mask = torch.zeros(2, 1, 2, 2)
    mask[0, :, 0, 0] = 1
    mask[1] = 1
    assert diffusion_loss(pred, target, mask, prior_loss_weight=0.5).item() == pytest.approx((9 + 1) / 2 + 0.5 * 1)
    assert diffusion_loss(pred[:2], target[:2], torch.ones(2, 1, 2, 2), 1.0).item() == pytest.approx(
        ((pred[:2] - target[:2]) ** 2).mean().item())


def test_learning_rate_scales_like_the_reference():
    assert learning_rate(1e-5, 2, 4, 3, prior=True, scale=True) == pytest.approx(1e-5 * 2 * 4 * 3 * 2)
    assert learning_rate(1e-5, 2, 4, 3, prior=False, scale=True) == pytest.approx(1e-5 * 24)
    assert learning_rate(1e-5, 2, 4, 3, prior=True, scale=False) == 1e-5


@pytest.mark.parametrize("processes,micro,accumulation", [(1, 2, 2), (2, 2, 1), (4, 1, 1)])
def test_one_two_and_four_processes_train_the_papers_batch_at_its_learning_rate(processes, micro, accumulation):
    hp = Hyperparameters()
    plan = batch_plan(hp.effective_batch_size, processes, hp.train_batch_size, hp.gradient_accumulation_steps)
    assert plan == (micro, accumulation)
    assert micro * processes * accumulation == 4  # + 4 class images: the paper's batch of 8
    lr = learning_rate(hp.learning_rate, micro, processes, accumulation, hp.with_prior_preservation, hp.scale_lr)
    assert lr == pytest.approx(8e-5)  # the paper's


def test_the_batch_plan_keeps_what_the_spec_sets_and_rounds_up_for_odd_process_counts():
    assert batch_plan(4, 1, 4, None) == (4, 1)  # train_batch_size alone: accumulation to the effective batch
    assert batch_plan(4, 1, 1, None) == (1, 4)
    assert batch_plan(4, 1, None, 4) == (1, 4)  # accumulation alone: the micro-batch
    assert batch_plan(4, 2, 3, 5) == (3, 5)  # both: the spec's step, whatever the effective batch
    assert batch_plan(4, 3, None, None) == (2, 1)  # 3 processes: 6 target images per step
    assert batch_plan(8, 1, None, None) == (2, 4)
