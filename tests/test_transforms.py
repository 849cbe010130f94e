"""The training crop: RandomResizedCrop's box, 80-100% of the image's area at an aspect ratio in [3/4, 4/3]."""
import random

import torch
from PIL import Image

from clipfromscratch.data.transforms import TRAIN_SCALE, _crop_box, image_transform


def test_the_crop_box_covers_80_to_100_percent_of_the_area_inside_the_image():
    random.seed(0)
    height, width = 180, 240
    areas = []
    for _ in range(2000):
        top, left, h, w = _crop_box(height, width)
        assert 0 <= top and top + h <= height and 0 <= left and left + w <= width
        # whole pixels: each side may round by half a pixel
        assert 3 / 4 * (1 - 1 / h) <= w / h <= 4 / 3 * (1 + 1 / h), (h, w)
        areas.append(h * w / (height * width))
    assert TRAIN_SCALE == (0.8, 1.0)
    assert 0.8 * 0.99 <= min(areas) < 0.81 and 0.99 < max(areas) <= 1.0


def test_an_image_no_crop_fits_is_taken_whole():
    random.seed(0)
    # 1 x 100: any crop of >= 80 px^2 at an aspect of at most 4/3 is taller than 1 px
    assert _crop_box(1, 100) == (0, 0, 1, 100)


def test_a_uniform_image_comes_out_as_its_normalised_colour_at_the_tower_size():
    random.seed(0)
    transform = image_transform(32, mean=(0.5, 0.5, 0.5), std=(0.25, 0.5, 1.0), train=True)
    pixels = transform(Image.new("RGB", (70, 50), (255, 0, 51)))
    expected = torch.tensor([(1 - 0.5) / 0.25, (0 - 0.5) / 0.5, (0.2 - 0.5) / 1.0]).view(3, 1, 1).expand(3, 32, 32)
    torch.testing.assert_close(pixels, expected)
