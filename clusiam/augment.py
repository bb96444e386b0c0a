"""The paper's augmentation recipe (MoCo v2 / SimSiam style), drawn per image and per view.

RandomResizedCrop(scale 0.2-1), ColorJitter(0.4, 0.4, 0.4, 0.1) with p = 0.8,
RandomGrayscale p = 0.2, GaussianBlur sigma in [0.1, 2] with p = 0.5, horizontal flip,
then normalisation with the training set's own per-channel mean and std.
"""
from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import default_collate
from torchvision.transforms import v2

BLUR_SIGMA = (0.1, 2.0)
# Odd kernel covering +-3 sigma at the largest sigma, like PIL's GaussianBlur(radius=sigma).
BLUR_KERNEL = 2 * math.ceil(3 * BLUR_SIGMA[1]) + 1


def paper_augmentation(image_size: int, mean: Sequence[float], std: Sequence[float]) -> v2.Compose:
    """One randomly augmented, normalised float view (3, image_size, image_size) of a PIL image."""
    return v2.Compose(
        [
            v2.RandomResizedCrop(image_size, scale=(0.2, 1.0), antialias=True),
            v2.RandomApply([v2.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
            v2.RandomGrayscale(p=0.2),
            v2.RandomApply([v2.GaussianBlur(BLUR_KERNEL, sigma=BLUR_SIGMA)], p=0.5),
            v2.RandomHorizontalFlip(),
            v2.PILToTensor(),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(mean=list(mean), std=list(std)),
        ]
    )


class TwoViews:
    """Two independent draws of the same transform: the positive pair."""

    def __init__(self, transform: Callable[[Image.Image], torch.Tensor]) -> None:
        self.transform = transform

    def __call__(self, image: Image.Image) -> tuple[torch.Tensor, torch.Tensor]:
        return self.transform(image), self.transform(image)


# ---------------------------------------------------------------------------------------
# Batched views: the same recipe applied on the training device to uint8 batches, with
# every parameter drawn per image and per view. Plain torch, so it runs on CPU and GPU.
# ---------------------------------------------------------------------------------------

# Ruifrok & Johnston's stain matrix (rows: haematoxylin, eosin, DAB optical densities), the
# same as scikit-image's skimage.color.rgb_from_hed.
RGB_FROM_HED = torch.tensor([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]])
# scikit-image's rgb2hed (skimage.color.separate_stains) clamps RGB to at least 1e-6 and divides
# the optical density -ln(rgb) by ln(10^6) = -ln(1e-6) (the darkest value it keeps, 1e-6, then has
# density 1) before unmixing; hed2rgb (combine_stains) multiplies by it again. The HEDJitter transforms
# (after Tellez et al. 2018) jitter these stain concentrations, so ours do too.
MIN_RGB = 1e-6
OD_PER_CONCENTRATION = -math.log(MIN_RGB)  # ln(10^6), about 13.82
GREY_WEIGHTS = (0.2989, 0.587, 0.114)  # ITU-R 601 luma, as torchvision's rgb_to_grayscale
CROP_ATTEMPTS = 10  # as torchvision's RandomResizedCrop


@dataclass(frozen=True)
class ViewRecipe:
    """Augmentation parameters; the defaults are the paper's. The last three are
    pathology options, off by default: vertical flips, 90-degree rotations, and H&E stain
    jitter (Tellez et al. 2018: each stain's concentration scaled by U(1-s, 1+s), shifted by
    U(-s, s), in scikit-image's rgb2hed units as the common HEDJitter transforms; see :func:`hed_jitter`)."""

    crop_scale: tuple[float, float] = (0.2, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    jitter_p: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.4
    hue: float = 0.1
    grey_p: float = 0.2
    blur_p: float = 0.5
    blur_sigma: tuple[float, float] = BLUR_SIGMA
    hflip_p: float = 0.5
    vflip_p: float = 0.0
    rotate90: bool = False
    hed_jitter: float = 0.0


def grey(images: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) -> (N, 1, H, W) luma."""
    r, g, b = images.unbind(1)
    return (GREY_WEIGHTS[0] * r + GREY_WEIGHTS[1] * g + GREY_WEIGHTS[2] * b).unsqueeze(1)


def sample_crops(n: int, height: int, width: int, scale: tuple[float, float],
                 ratio: tuple[float, float]) -> torch.Tensor:
    """RandomResizedCrop boxes (top, left, h, w) for ``n`` images, drawn as torchvision
    does: up to 10 tries of area fraction ~ U(scale) and log aspect ~ U(log ratio), the
    first that fits; else the whole image clipped to the ratio range, centred."""
    area = height * width
    fraction = torch.empty(n, CROP_ATTEMPTS).uniform_(*scale)
    aspect = torch.empty(n, CROP_ATTEMPTS).uniform_(math.log(ratio[0]), math.log(ratio[1])).exp()
    w = (area * fraction * aspect).sqrt().round()
    h = (area * fraction / aspect).sqrt().round()
    fits = (w > 0) & (h > 0) & (w <= width) & (h <= height)
    first = fits.float().argmax(1, keepdim=True)
    found = fits.any(1)
    w, h = w.gather(1, first).squeeze(1), h.gather(1, first).squeeze(1)
    fallback_w, fallback_h = float(width), float(height)
    if width / height < ratio[0]:
        fallback_h = float(round(width / ratio[0]))
    elif width / height > ratio[1]:
        fallback_w = float(round(height * ratio[1]))
    w = torch.where(found, w, torch.full_like(w, fallback_w))
    h = torch.where(found, h, torch.full_like(h, fallback_h))
    top = torch.where(found, (torch.rand(n) * (height - h + 1)).floor(), ((height - h) / 2).floor())
    left = torch.where(found, (torch.rand(n) * (width - w + 1)).floor(), ((width - w) / 2).floor())
    return torch.stack([top, left, h, w], 1)


def crop_resize(images: torch.Tensor, boxes: torch.Tensor, size: int, orientation: torch.Tensor) -> torch.Tensor:
    """Bilinear crop of each box to size x size in one ``grid_sample``; ``orientation``
    (N, 2, 2) maps output to input directions, which folds flips and rotations in."""
    n, _, height, width = images.shape
    top, left, h, w = boxes.unbind(1)
    theta = torch.zeros(n, 2, 3, device=images.device, dtype=images.dtype)
    scale = torch.stack([w / width, h / height], 1).to(images.dtype)  # half-extent in [-1, 1] units
    theta[:, :, :2] = scale.unsqueeze(2) * orientation
    theta[:, 0, 2] = (2 * left + w) / width - 1  # box centre in [-1, 1] units
    theta[:, 1, 2] = (2 * top + h) / height - 1
    grid = F.affine_grid(theta, [n, 3, size, size], align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)


def sample_orientation(n: int, recipe: ViewRecipe) -> torch.Tensor:
    """(N, 2, 2) output-to-input direction matrices: flips, and 90-degree rotations."""
    hflip = torch.where(torch.rand(n) < recipe.hflip_p, -1.0, 1.0)
    vflip = torch.where(torch.rand(n) < recipe.vflip_p, -1.0, 1.0)
    orientation = torch.diag_embed(torch.stack([hflip, vflip], 1))
    if recipe.rotate90:
        quarter = torch.randint(0, 4, (n,)).float() * (math.pi / 2)
        cos, sin = quarter.cos().round(), quarter.sin().round()
        rotation = torch.stack([torch.stack([cos, -sin], 1), torch.stack([sin, cos], 1)], 1)
        orientation = rotation @ orientation
    return orientation


def blend(images: torch.Tensor, self_weight: torch.Tensor, grey_weight: torch.Tensor,
          mean_weight: torch.Tensor) -> torch.Tensor:
    """clamp(a x + b grey(x) + c mean(grey(x))) per image: brightness is (f, 0, 0),
    saturation (f, 1 - f, 0), contrast (f, 0, 1 - f), nothing (1, 0, 0) -- one pass for
    whichever of the three each image draws at this position of its jitter order."""
    luma = grey(images)
    shape = (-1, 1, 1, 1)
    mixed = (self_weight.view(shape) * images + grey_weight.view(shape) * luma
             + mean_weight.view(shape) * luma.mean((2, 3), keepdim=True))
    return mixed.clamp_(0, 1)


def shift_hue(images: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Rotate each image's hue by ``shift`` (fractions of a turn), through HSV."""
    value, _ = images.max(1, keepdim=True)
    chroma = value - images.min(1, keepdim=True)[0]
    r, g, b = images.unbind(1)
    safe = torch.where(chroma > 0, chroma, torch.ones_like(chroma)).squeeze(1)
    hue = torch.where(value.squeeze(1) == r, ((g - b) / safe) % 6,
                      torch.where(value.squeeze(1) == g, (b - r) / safe + 2, (r - g) / safe + 4))
    hue = torch.where(chroma.squeeze(1) > 0, hue / 6, torch.zeros_like(hue))
    hue = (hue + shift.view(-1, 1, 1)) % 1.0
    # HSV -> RGB: channel n (5, 3, 1 for r, g, b) is v - c * clamp(min(k, 4 - k), 0, 1), k = (n + 6h) mod 6.
    offsets = torch.arange(5.0, 0.0, -2.0, device=images.device, dtype=images.dtype).view(1, 3, 1, 1)  # 5, 3, 1
    k = (offsets + 6 * hue.unsqueeze(1)) % 6
    return (value - chroma * torch.minimum(k, 4 - k).clamp(0, 1)).clamp_(0, 1)


def hue_rows(order: torch.Tensor) -> list[torch.Tensor]:
    """For each of the four positions of the jitter order, the images whose hue shift
    comes there. Computed on the host from the host-side draws, so no sync is needed."""
    return [(order[:, position] == 3).nonzero().squeeze(1) for position in range(4)]


def colour_jitter(images: torch.Tensor, factors: torch.Tensor, hue: torch.Tensor, order: torch.Tensor,
                  rows: Sequence[torch.Tensor]) -> torch.Tensor:
    """torchvision's ColorJitter with per-image draws: ``factors`` (N, 3) for brightness,
    contrast and saturation, ``hue`` (N,), and ``order`` (N, 4), each image's order of the
    four adjustments (0-3; -1 skips the position), clamping after each. ``rows`` is
    :func:`hue_rows` of ``order``: the costly HSV round trip runs only on those images."""
    ones, zeros = torch.ones_like(hue), torch.zeros_like(hue)
    for position in range(4):
        op = order[:, position]
        brightness, contrast, saturation = (op == 0), (op == 1), (op == 2)
        factor = torch.where(brightness, factors[:, 0], torch.where(contrast, factors[:, 1],
                             torch.where(saturation, factors[:, 2], ones)))
        images = blend(images, factor, torch.where(saturation, 1 - factor, zeros),
                       torch.where(contrast, 1 - factor, zeros))
        if len(rows[position]):
            shifted = shift_hue(images.index_select(0, rows[position]), hue.index_select(0, rows[position]))
            images = images.index_copy(0, rows[position], shifted)
    return images


def gaussian_blur(images: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Separable Gaussian blur with a per-image sigma, a 13-tap kernel and reflect padding
    (as torchvision's GaussianBlur(13))."""
    n, c, height, width = images.shape
    half = BLUR_KERNEL // 2
    taps = torch.arange(-half, half + 1, device=images.device, dtype=images.dtype)
    kernel = torch.exp(-0.5 * (taps.view(1, -1) / sigma.view(-1, 1).to(images.dtype)) ** 2)
    kernel = (kernel / kernel.sum(1, keepdim=True)).repeat_interleave(c, 0)  # one kernel per channel
    flat = images.reshape(1, n * c, height, width)
    flat = F.conv2d(F.pad(flat, (half, half, 0, 0), mode="reflect"), kernel.view(n * c, 1, 1, -1), groups=n * c)
    flat = F.conv2d(F.pad(flat, (0, 0, half, half), mode="reflect"), kernel.view(n * c, 1, -1, 1), groups=n * c)
    return flat.view(n, c, height, width)


@functools.lru_cache
def stain_matrices(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """RGB-from-HED and its inverse (taken in float64, as scikit-image's) on ``device``, copied there once."""
    return RGB_FROM_HED.to(device), torch.linalg.inv(RGB_FROM_HED.double()).float().to(device)


def hed_jitter(images: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Perturb each image's haematoxylin, eosin and DAB concentrations: c' = c * scale + shift, with
    ``scale`` and ``shift`` of shape (N, 3). Per image this is scikit-image's
    ``hed2rgb(rgb2hed(x) * scale + shift)``: concentrations are optical densities over ln(10^6)
    (:data:`OD_PER_CONCENTRATION`), clipped at 0 before the jitter (so scale 1, shift 0 is
    rgb2hed's round trip, not the identity, where a concentration is negative); RGB is clipped to [0, 1]."""
    rgb_from_hed, hed_from_rgb = stain_matrices(images.device)
    density = -torch.log(images.clamp(min=MIN_RGB)).permute(0, 2, 3, 1)  # (N, H, W, 3) optical density
    concentration = ((density / OD_PER_CONCENTRATION) @ hed_from_rgb).clamp_(min=0)
    concentration = concentration * scale.view(-1, 1, 1, 3) + shift.view(-1, 1, 1, 3)  # not clipped, as hed2rgb
    rgb = torch.exp(-(concentration * OD_PER_CONCENTRATION) @ rgb_from_hed).clamp_(0, 1)
    return rgb.permute(0, 3, 1, 2).contiguous()


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on ``device``; to a GPU through pinned memory, so the copy is
    asynchronous (a copy from pageable memory would wait for the GPU's queue)."""
    if device.type != "cuda":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


class ViewParams(NamedTuple):
    """Every random draw of one view of a batch; row i belongs to image i."""

    boxes: torch.Tensor  # (N, 4) crop top, left, height, width in input pixels
    orientation: torch.Tensor  # (N, 2, 2) flips / rotations
    jitter_factors: torch.Tensor  # (N, 3) brightness, contrast, saturation
    hue: torch.Tensor  # (N,)
    jitter_order: torch.Tensor  # (N, 4) op order, all -1 where the image is not jittered
    greyed: torch.Tensor  # (N,) bool
    blurred: torch.Tensor  # (N,) bool
    sigma: torch.Tensor  # (N,)
    hed_scale: torch.Tensor  # (N, 3)
    hed_shift: torch.Tensor  # (N, 3)

    def to_device(self, device: torch.device) -> ViewParams:
        """The draws on ``device``, in one copy."""
        if device.type != "cuda":
            return ViewParams(*(t.to(device) for t in self))
        flat = to_device(torch.cat([t.reshape(len(t), -1).float() for t in self], 1), device)
        pieces = flat.split([t[0].numel() for t in self], 1)
        return ViewParams(*(piece.reshape(t.shape).to(t.dtype) for piece, t in zip(pieces, self)))


def sample_view_params(n: int, height: int, width: int, recipe: ViewRecipe) -> ViewParams:
    """Draw one view's parameters for ``n`` images of height x width, on the CPU (the
    global torch generator): the device never has to report back which images to blur."""
    jittered = torch.rand(n) < recipe.jitter_p
    order = torch.where(jittered.unsqueeze(1), torch.rand(n, 4).argsort(1), -1)
    factors = torch.stack([torch.empty(n).uniform_(1 - s, 1 + s)
                           for s in (recipe.brightness, recipe.contrast, recipe.saturation)], 1)
    s = recipe.hed_jitter
    return ViewParams(
        boxes=sample_crops(n, height, width, recipe.crop_scale, recipe.crop_ratio),
        orientation=sample_orientation(n, recipe),
        jitter_factors=factors,
        hue=torch.empty(n).uniform_(-recipe.hue, recipe.hue),
        jitter_order=order,
        greyed=torch.rand(n) < recipe.grey_p,
        blurred=torch.rand(n) < recipe.blur_p,
        sigma=torch.empty(n).uniform_(*recipe.blur_sigma),
        hed_scale=torch.empty(n, 3).uniform_(1 - s, 1 + s),
        hed_shift=torch.empty(n, 3).uniform_(-s, s),
    )


class BatchViews:
    """Two augmented, normalised views of a uint8 batch (N, 3, H, W), every parameter
    drawn per image and per view; the pixel work runs on the batch's device."""

    def __init__(self, image_size: int, mean: Sequence[float], std: Sequence[float],
                 recipe: ViewRecipe = ViewRecipe()) -> None:
        self.image_size = image_size
        self.mean = torch.tensor(mean).view(1, 3, 1, 1)
        self.std = torch.tensor(std).view(1, 3, 1, 1)
        self.recipe = recipe

    def apply(self, images: torch.Tensor, params: ViewParams) -> torch.Tensor:
        """One view of float images in [0, 1] with the given draws."""
        device = images.device
        if self.mean.device != device:  # copied once, not every step
            self.mean, self.std = self.mean.to(device), self.std.to(device)
        p = params.to_device(device)
        out = crop_resize(images, p.boxes, self.image_size, p.orientation)
        if self.recipe.hed_jitter > 0:
            out = hed_jitter(out, p.hed_scale, p.hed_shift)
        rows = [to_device(r, device) for r in hue_rows(params.jitter_order)]
        out = colour_jitter(out, p.jitter_factors, p.hue, p.jitter_order, rows)
        out = torch.where(p.greyed.view(-1, 1, 1, 1), grey(out).expand_as(out), out)
        # Blur only the images that drew it; their indices are known on the host, no sync.
        blurred = to_device(params.blurred.nonzero().squeeze(1), device)
        if len(blurred):
            out = out.index_copy(0, blurred,
                                 gaussian_blur(out.index_select(0, blurred), p.sigma.index_select(0, blurred)))
        return (out - self.mean) / self.std

    def __call__(self, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Two views of a uint8 batch, or of float images in [0, 1] (:func:`stored_patches`)."""
        n, _, height, width = batch.shape
        images = batch.float().div_(255) if batch.dtype == torch.uint8 else batch
        return tuple(self.apply(images, sample_view_params(n, height, width, self.recipe)) for _ in range(2))


# ---------------------------------------------------------------------------------------
# Patches as stored, from the DataLoader workers to the training device. A slide without a
# pyramid level at the patches' resolution (most 40x Aperio files: levels at 40x, 10x,
# 2.5x) gives twice the patch size; resizing there, on the training device, spares the
# workers' CPUs the costliest step of reading such a patch.
# ---------------------------------------------------------------------------------------

StoredPart = list[tuple[list[int], torch.Tensor]]  # (positions in the part, (n, H, W, 3) uint8) per size


def stack_by_size(patches: Sequence[torch.Tensor]) -> StoredPart:
    """A DataLoader ``collate_fn``: one part's (H, W, 3) uint8 patches, stacked by size (a cohort
    may mix slides read at the patch size and at twice it)."""
    sizes: dict[tuple[int, ...], list[int]] = {}
    for position, patch in enumerate(patches):
        sizes.setdefault(tuple(patch.shape), []).append(position)
    return [(positions, default_collate([patches[i] for i in positions])) for positions in sizes.values()]


def stored_patches(parts: Sequence[StoredPart], size: int | None, device: torch.device) -> torch.Tensor:
    """The parts of one step as float images in [0, 1], (N, 3, size, size) on ``device`` in the
    parts' order; patches stored larger are resized there, as the crop of the views resizes them
    anyway, with antialiased bicubic (PIL's BICUBIC, which TRIDENT resizes with: within 0.3 of
    255 of it on average; the CPU's Lanczos differs from either by about 1.7). ``size`` None: as
    stored (one size)."""
    pieces, positions, start = [], [], 0
    for part in parts:
        for places, stacked in part:
            images = to_device(stacked, device).permute(0, 3, 1, 2).float().div_(255)
            if size is not None and images.shape[-2:] != (size, size):
                images = F.interpolate(images, size=(size, size), mode="bicubic", antialias=True,
                                       align_corners=False).clamp_(0, 1)
            pieces.append(images)
            positions.extend(start + place for place in places)
        start += sum(len(places) for places, _ in part)
    images = torch.cat(pieces)
    if positions != sorted(positions):
        images = images[torch.as_tensor(positions, device=device).argsort()]
    return images
