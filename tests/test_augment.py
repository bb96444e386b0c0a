import pytest
import torch
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from clusiam.augment import (
    RGB_FROM_HED,
    BatchViews,
    ViewRecipe,
    blend,
    colour_jitter,
    crop_resize,
    gaussian_blur,
    grey,
    hed_jitter,
    hue_rows,
    sample_crops,
    sample_view_params,
    shift_hue,
)

N = 20000  # draws for frequency checks: a binomial share's std is then at most 0.0035
IDENTITY = torch.eye(2).expand(1, 2, 2)


@pytest.fixture
def images():
    torch.manual_seed(0)
    return torch.rand(6, 3, 40, 40)


def test_crops_follow_random_resized_crop():
    torch.manual_seed(1)
    top, left, h, w = sample_crops(N, 224, 224, (0.2, 1.0), (3 / 4, 4 / 3)).unbind(1)
    area, aspect = h * w / 224**2, w / h
    # Crop sides are rounded to whole pixels, as torchvision does, which moves the bounds by ~1 %.
    assert area.min() >= 0.2 * 0.99 and area.max() <= 1.0
    assert aspect.min() >= 3 / 4 * 0.98 and aspect.max() <= 4 / 3 * 1.02
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= 224).all() and (left + w <= 224).all()
    crop = v2.RandomResizedCrop(224, scale=(0.2, 1.0))
    reference = [crop.make_params([torch.empty(3, 224, 224)]) for _ in range(4000)]
    reference_area = torch.tensor([r["height"] * r["width"] / 224**2 for r in reference])
    assert area.mean().item() == pytest.approx(reference_area.mean().item(), abs=0.015)
    assert area.std().item() == pytest.approx(reference_area.std().item(), abs=0.015)


def test_draw_frequencies_follow_the_recipe():
    torch.manual_seed(2)
    params = sample_view_params(N, 64, 64, ViewRecipe())
    flipped = params.orientation[:, 0, 0] < 0
    assert flipped.float().mean().item() == pytest.approx(0.5, abs=0.02)
    assert params.greyed.float().mean().item() == pytest.approx(0.2, abs=0.02)
    assert params.blurred.float().mean().item() == pytest.approx(0.5, abs=0.02)
    assert (params.jitter_order[:, 0] >= 0).float().mean().item() == pytest.approx(0.8, abs=0.02)
    assert (params.orientation[:, 1, 1] == 1).all()  # no vertical flips unless asked
    assert params.sigma.min() >= 0.1 and params.sigma.max() <= 2.0
    assert params.jitter_factors.min() >= 0.6 and params.jitter_factors.max() <= 1.4
    assert params.hue.abs().max() <= 0.1
    orders = {tuple(o) for o in params.jitter_order[params.jitter_order[:, 0] >= 0].tolist()}
    assert len(orders) == 24  # every order of the four adjustments occurs


def test_every_image_and_view_gets_its_own_draws():
    torch.manual_seed(3)
    batch = torch.full((16, 3, 48, 48), 128, dtype=torch.uint8)
    batch[:, 0, :, :24] = 30  # an asymmetric image, so crops and flips show
    first, second = sample_view_params(16, 48, 48, ViewRecipe()), sample_view_params(16, 48, 48, ViewRecipe())
    assert len({tuple(box) for box in first.boxes.tolist()}) == 16
    assert len(set(first.sigma.tolist())) == 16 and 0 < first.blurred.sum() < 16
    assert not torch.equal(first.boxes, second.boxes)
    view1, view2 = BatchViews(32, [0.5] * 3, [0.2] * 3)(batch)
    assert view1.shape == view2.shape == (16, 3, 32, 32)
    assert all(not torch.allclose(view1[i], view2[i]) for i in range(16))
    assert all(not torch.allclose(view1[0], view1[i]) for i in range(1, 16))


def test_views_are_normalised_with_the_given_statistics():
    plain = ViewRecipe(crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), jitter_p=0, grey_p=0, blur_p=0, hflip_p=0)
    batch = torch.full((2, 3, 24, 24), 0, dtype=torch.uint8)
    batch[:, 0], batch[:, 1], batch[:, 2] = 200, 100, 50
    mean, std = [0.6, 0.4, 0.3], [0.2, 0.25, 0.1]
    view, _ = BatchViews(16, mean, std, plain)(batch)
    for channel, value in enumerate((200, 100, 50)):
        expected = (value / 255 - mean[channel]) / std[channel]
        assert torch.allclose(view[:, channel], torch.tensor(expected), atol=1e-5)


def test_crop_and_resize_match_torchvision(images):
    box = torch.tensor([[5.0, 7.0, 20.0, 26.0]])
    ours = crop_resize(images[:1], box, 32, IDENTITY)
    theirs = TF.resized_crop(images[:1], 5, 7, 20, 26, [32, 32], antialias=False)
    # edges differ by a half-pixel clamp
    assert torch.allclose(ours[..., 1:-1, 1:-1], theirs[..., 1:-1, 1:-1], atol=1e-5)
    flipped = crop_resize(images[:1], box, 32, torch.diag(torch.tensor([-1.0, 1.0])).unsqueeze(0))
    assert torch.allclose(flipped, ours.flip(-1), atol=1e-5)


@pytest.mark.parametrize("factor", [0.6, 1.0, 1.37])
def test_colour_adjustments_match_torchvision(images, factor):
    ones, zeros, f = torch.ones(6), torch.zeros(6), torch.full((6,), factor)
    assert torch.allclose(blend(images, f, zeros, zeros), TF.adjust_brightness(images, factor), atol=1e-6)
    assert torch.allclose(blend(images, f, zeros, 1 - f), TF.adjust_contrast(images, factor), atol=1e-6)
    assert torch.allclose(blend(images, f, 1 - f, zeros), TF.adjust_saturation(images, factor), atol=1e-6)
    assert torch.allclose(grey(images), TF.rgb_to_grayscale(images), atol=1e-6)
    shift = factor - 1.0  # -0.4 .. 0.37 turns
    assert torch.allclose(shift_hue(images, torch.full((6,), shift)), TF.adjust_hue(images, shift), atol=1e-5)
    assert torch.allclose(blend(images, ones, zeros, zeros), images)


def test_jitter_applies_each_images_own_order(images):
    factors = torch.tensor([[1.3, 0.7, 1.2]]).expand(6, 3)
    hue = torch.full((6,), 0.08)
    orders = torch.tensor([[0, 1, 2, 3], [3, 2, 1, 0], [2, 0, 3, 1], [1, 3, 0, 2], [-1, -1, -1, -1], [3, 0, 2, 1]])
    ours = colour_jitter(images, factors, hue, orders, hue_rows(orders))
    steps = [lambda x: TF.adjust_brightness(x, 1.3), lambda x: TF.adjust_contrast(x, 0.7),
             lambda x: TF.adjust_saturation(x, 1.2), lambda x: TF.adjust_hue(x, 0.08)]
    for i, order in enumerate(orders.tolist()):
        expected = images[i]
        for op in order:
            expected = steps[op](expected) if op >= 0 else expected
        assert torch.allclose(ours[i], expected, atol=1e-5), order
    assert not torch.allclose(ours[0], ours[1])  # the order matters


@pytest.mark.parametrize("sigma", [0.1, 0.8, 2.0])
def test_blur_matches_torchvision(images, sigma):
    ours = gaussian_blur(images, torch.full((6,), sigma))
    assert torch.allclose(ours, TF.gaussian_blur(images, [13, 13], [sigma, sigma]), atol=1e-5)


def test_blur_uses_each_images_own_sigma(images):
    sigmas = torch.tensor([0.3, 1.9, 0.3, 1.9, 1.0, 0.1])
    ours = gaussian_blur(images, sigmas)
    for i, sigma in enumerate(sigmas.tolist()):
        assert torch.allclose(ours[i], TF.gaussian_blur(images[i], [13, 13], [sigma, sigma]), atol=1e-5)


def test_hed_jitter_changes_stain_densities_as_drawn(images):
    stained = images * 0.8 + 0.1
    unchanged = hed_jitter(stained, torch.ones(6, 3), torch.zeros(6, 3))
    assert torch.allclose(unchanged, stained, atol=1e-4)
    shift = torch.tensor([[0.05, 0.0, 0.0]]).expand(6, 3)  # more haematoxylin everywhere
    darker = hed_jitter(stained, torch.ones(6, 3), shift)
    density_change = -torch.log(darker) + torch.log(stained)  # optical density, per RGB channel
    expected = 0.05 * RGB_FROM_HED[0].view(1, 3, 1, 1)
    assert torch.allclose(density_change, expected.expand_as(density_change), atol=1e-4)


def test_pathology_options_flip_vertically_and_rotate_by_quarter_turns():
    torch.manual_seed(4)
    recipe = ViewRecipe(vflip_p=0.5, rotate90=True)
    orientation = sample_view_params(N, 64, 64, recipe).orientation
    assert (orientation.abs().sum((1, 2)) == 2).all()  # signed permutation matrices only
    swapped = orientation[:, 0, 0] == 0
    assert swapped.float().mean().item() == pytest.approx(0.5, abs=0.02)  # 90 and 270 degree turns
    assert len({tuple(m.flatten().tolist()) for m in orientation}) == 8  # the whole dihedral group

    whole = ViewRecipe(crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), jitter_p=0, grey_p=0, blur_p=0, hflip_p=0,
                       rotate90=True)
    image = torch.rand(1, 3, 16, 16)
    params = sample_view_params(1, 16, 16, whole)
    view = BatchViews(16, [0.0] * 3, [1.0] * 3, whole).apply(image, params)
    assert any(torch.allclose(view, torch.rot90(image, k, (2, 3)), atol=1e-5) for k in range(4))
