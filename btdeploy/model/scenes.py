"""Picture-like images made from a seed, for calibrating and checking where the user gave no images.

Random pixels are nothing like a picture: a photo, an icon or a diagram is mostly flat or slowly
graded regions with edges between them, and the vision tower's activations on those have other
ranges than on noise. A graph calibrated on noise alone missed the INT8 floors on such images
(base itc, image embeddings at cosine 0.963 where 0.99 is the floor); one calibrated on noise and
these scenes row by row in turn passed on pictures it had never seen (0.998).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

MAX_SHAPES = 6
# What generated inputs hold where the export has no processor to draw scenes through.
NOISE_ALONE = "random pixels alone (the export has no processor to draw synthetic scenes through)"


def scenes(count: int, size: int, seed: int) -> list[np.ndarray]:
    """`count` RGB images, [size, size, 3] uint8: a background graded between two colours in a
    random direction, one to MAX_SHAPES flat ellipses and rectangles over it, and grain of a random
    strength (none to a little), as a camera adds."""
    rng = np.random.default_rng(seed)
    rows, columns = np.mgrid[0:size, 0:size] / size
    pictures = []
    for _ in range(count):
        angle = rng.uniform(0, 2 * np.pi)
        ramp = np.cos(angle) * columns + np.sin(angle) * rows
        ramp = (ramp - ramp.min()) / max(float(np.ptp(ramp)), 1e-6)
        start, end = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
        image = start + ramp[..., None] * (end - start)
        for _ in range(int(rng.integers(1, MAX_SHAPES + 1))):
            (x, y), (half_width, half_height) = rng.uniform(0, 1, 2), rng.uniform(0.05, 0.4, 2)
            if rng.random() < 0.5:
                inside = ((columns - x) / half_width) ** 2 + ((rows - y) / half_height) ** 2 <= 1
            else:
                inside = (np.abs(columns - x) <= half_width) & (np.abs(rows - y) <= half_height)
            image[inside] = rng.uniform(0, 255, 3)
        image += rng.normal(0.0, rng.uniform(0, 12), image.shape)
        pictures.append(np.clip(np.rint(image), 0, 255).astype(np.uint8))
    return pictures


def put_scenes(feeds: dict[str, np.ndarray], rows: Sequence[int], processor: Any, seed: int) -> dict[str, np.ndarray]:
    """`feeds` with the pixels of `rows` replaced by scenes drawn from `seed`, as the checkpoint's
    `processor` makes the pixels of a picture (resized, cropped and normalised)."""
    from PIL import Image

    from btdeploy.model.media import image_inputs

    rows = list(rows)
    if rows:
        size = int(feeds["pixel_values"].shape[-1])
        pictures = [Image.fromarray(picture) for picture in scenes(len(rows), size, seed)]
        feeds["pixel_values"][rows] = image_inputs(processor, pictures)
    return feeds
