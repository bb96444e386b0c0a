import numpy as np
import pytest
import tiffslide
import torch
from PIL import Image
from skimage.color import hed2rgb, rgb2hed, rgb_from_hed
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from clusiam.augment import (
    OD_PER_CONCENTRATION,
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
    stack_by_size,
    stored_patches,
)
from clusiam.demo import CMU_SLIDE

N = 20000  # draws for frequency checks: a binomial share's std is then at most 0.0035
IDENTITY = torch.eye(2).expand(1, 2, 2)
TISSUE = ((1120, 800), (1344, 1024), (1248, 1312), (1088, 1664), (1344, 1952), (704, 2592))  # demo slide, (x, y)


@pytest.fixture
def images():
    torch.manual_seed(0)
    return torch.rand(6, 3, 40, 40)


@pytest.fixture(scope="module")
def he_patches():
    """Six real H&E 32 x 32 patches from the demo slide, float (6, 3, 32, 32) in [0, 1]."""
    with tiffslide.TiffSlide(CMU_SLIDE) as slide:
        patches = [np.asarray(slide.read_region(corner, 0, (32, 32)).convert("RGB")) for corner in TISSUE]
    return torch.from_numpy(np.stack(patches)).permute(0, 3, 1, 2).float() / 255


def skimage_hed_jitter(images: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """The HEDJitter people copy, image by image: hed2rgb(rgb2hed(x) * scale + shift), in float64."""
    out = [hed2rgb(rgb2hed(image.permute(1, 2, 0).double().numpy()) * s.double().numpy() + t.double().numpy())
           for image, s, t in zip(images, scale, shift)]
    return torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2)


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


def test_hed_jitter_changes_stain_densities_as_drawn():
    # Synthetic stain mixtures: positive concentrations (scikit-image's units), so rgb2hed clips nothing.
    torch.manual_seed(0)
    concentration = torch.rand(6, 40, 40, 3) * torch.tensor([0.15, 0.15, 0.03]) + 0.01
    stained = torch.exp(-(concentration * OD_PER_CONCENTRATION) @ RGB_FROM_HED).permute(0, 3, 1, 2)
    unchanged = hed_jitter(stained, torch.ones(6, 3), torch.zeros(6, 3))
    assert torch.allclose(unchanged, stained, atol=1e-4)
    shift = torch.tensor([[0.05, 0.0, 0.0]]).expand(6, 3)  # more haematoxylin everywhere
    darker = hed_jitter(stained, torch.ones(6, 3), shift)
    density_change = -torch.log(darker) + torch.log(stained)  # optical density, per RGB channel
    expected = 0.05 * OD_PER_CONCENTRATION * RGB_FROM_HED[0].view(1, 3, 1, 1)  # a concentration is OD / ln(10^6)
    assert torch.allclose(density_change, expected.expand_as(density_change), atol=1e-4)


def test_stain_matrix_is_scikit_images():
    assert np.allclose(RGB_FROM_HED.double().numpy(), rgb_from_hed, atol=1e-7)
    assert OD_PER_CONCENTRATION == pytest.approx(np.log(1e6))


@pytest.mark.parametrize("strength", [0.05, 0.2])
def test_hed_jitter_matches_scikit_images_hed_jitter(he_patches, strength):
    # Whole-image crops and nothing else, so the batched pipeline can be checked too.
    only_hed = ViewRecipe(crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), jitter_p=0, grey_p=0, blur_p=0, hflip_p=0,
                          hed_jitter=strength)
    torch.manual_seed(5)
    params = sample_view_params(6, 32, 32, only_hed)
    scale, shift = params.hed_scale, params.hed_shift
    assert ((scale - 1).abs() <= strength).all() and (shift.abs() <= strength).all()
    assert len(set(scale[:, 0].tolist())) == 6  # a draw per image
    ours = hed_jitter(he_patches, scale, shift)
    theirs = skimage_hed_jitter(he_patches, scale, shift)
    inside = (theirs > 0) & (theirs < 1)  # away from clipping
    assert inside.float().mean() > 0.25
    assert (ours.double() - theirs).abs()[inside].max() < 1 / 255
    # The jitter does something visible (a raw-OD jitter would do about ln(10^6) = 13.8 times less).
    assert (theirs - he_patches.double()).abs().mean() > 10 / 255

    # The same through the batched pipeline (no normalisation).
    view = BatchViews(32, [0.0] * 3, [1.0] * 3, only_hed).apply(he_patches, params)
    assert (view.double() - theirs).abs()[inside].max() < 1 / 255


def test_hed_jitter_without_a_draw_is_scikit_images_round_trip(he_patches):
    ours = hed_jitter(he_patches, torch.ones(6, 3), torch.zeros(6, 3))
    round_trip = skimage_hed_jitter(he_patches, torch.ones(6, 3), torch.zeros(6, 3))
    assert (ours.double() - round_trip).abs().max() < 1 / 255
    # rgb2hed clips negative concentrations at 0, so its round trip is not the identity on real H&E.
    assert (round_trip - he_patches.double()).abs().max() > 20 / 255


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


def as_float(pixels: np.ndarray) -> torch.Tensor:
    """(H, W, 3) uint8 -> (3, H, W) float in [0, 1]."""
    return torch.from_numpy(pixels.copy()).permute(2, 0, 1).float() / 255


def test_patches_stored_at_two_sizes_reach_the_device_in_order_at_the_patch_size():
    """A cohort may mix slides read at the patch size (a 20x level) and at twice it (40x only):
    a worker stacks its part by size, and the step's patches come out in the parts' order, those
    stored larger resized on the device no further from the CPU's Lanczos resize than PIL's
    bicubic (TRIDENT's filter) is: within the interpolation's own error."""
    with tiffslide.TiffSlide(CMU_SLIDE) as slide:
        large = [np.asarray(slide.read_region(corner, 0, (64, 64)).convert("RGB")) for corner in TISSUE[:3]]
        small = [np.asarray(slide.read_region(corner, 0, (32, 32)).convert("RGB")) for corner in TISSUE[3:]]
    first = stack_by_size([torch.from_numpy(p.copy()) for p in (small[0], large[0], small[1])])
    second = stack_by_size([torch.from_numpy(p.copy()) for p in (large[1], large[2], small[2])])
    assert [(places, tuple(stacked.shape)) for places, stacked in first] == [([0, 2], (2, 32, 32, 3)),
                                                                             ([1], (1, 64, 64, 3))]
    batch = stored_patches([first, second], 32, torch.device("cpu"))
    assert batch.shape == (6, 3, 32, 32) and batch.dtype == torch.float32
    for place, pixels in ((0, small[0]), (2, small[1]), (5, small[2])):
        torch.testing.assert_close(batch[place], as_float(pixels), rtol=0, atol=0)
    for place, pixels in ((1, large[0]), (3, large[1]), (4, large[2])):
        lanczos = as_float(np.asarray(Image.fromarray(pixels).resize((32, 32), Image.LANCZOS)))
        bicubic = as_float(np.asarray(Image.fromarray(pixels).resize((32, 32), Image.BICUBIC)))
        assert (batch[place] - bicubic).abs().mean() < 0.5 / 255
        assert (batch[place] - lanczos).abs().mean() < 1.1 * (bicubic - lanczos).abs().mean()
