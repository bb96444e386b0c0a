"""The paper's augmentation recipe (MoCo v2 / SimSiam style), drawn per image and per view.

RandomResizedCrop(scale 0.2-1), ColorJitter(0.4, 0.4, 0.4, 0.1) with p = 0.8,
RandomGrayscale p = 0.2, GaussianBlur sigma in [0.1, 2] with p = 0.5, horizontal flip,
then normalisation with the training set's own per-channel mean and std.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
from PIL import Image
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
