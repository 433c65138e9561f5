"""Aspect-ratio buckets: picture sizes of (about) equal area, so a tall or wide picture trains
whole instead of centre-cropped to a square.

The list is the one kohya's trainers make: for every width in steps of `step`, the tallest height
(in steps too) whose area stays within resolution^2, and the same sizes transposed. A picture goes
to the bucket nearest its aspect ratio (in log scale, so 2:1 and 1:2 are equally far from 1:1),
is resized to cover it and cropped by what is left over. A picture that would be enlarged more
than `max_upscale` times gets a smaller bucket of its own aspect instead: blowing up a small
picture teaches blur.
"""

from __future__ import annotations

import math
from functools import lru_cache

Size = tuple[int, int]  # (width, height) in pixels


@lru_cache(maxsize=64)
def bucket_sizes(resolution: int, step: int, max_aspect: float) -> tuple[Size, ...]:
    """Every bucket for `resolution`, from the widest to the tallest."""
    area = resolution * resolution
    sizes = {(resolution // step * step,) * 2}
    width = step
    while width <= resolution * max_aspect:
        height = area // width // step * step
        if height >= step and max(width / height, height / width) <= max_aspect:
            sizes.update({(width, height), (height, width)})
        width += step
    return tuple(sorted(sizes, key=lambda s: -s[0] / s[1]))


def nearest_bucket(width: int, height: int, resolution: int, step: int, max_aspect: float,
                   max_upscale: float) -> Size:
    """The bucket a `width` x `height` picture trains in."""
    aspect = math.log(width / height)
    bucket = min(bucket_sizes(resolution, step, max_aspect),
                 key=lambda s: (abs(math.log(s[0] / s[1]) - aspect), -s[0] * s[1]))
    if max(bucket[0] / width, bucket[1] / height) <= max_upscale:  # how much covering it enlarges
        return bucket
    # Its own, smaller bucket: the picture's aspect (clamped), at most max_upscale times its size.
    clamped = max(-math.log(max_aspect), min(math.log(max_aspect), aspect))
    side = math.sqrt(width * height) * max_upscale
    w, h = side * math.exp(clamped / 2), side * math.exp(-clamped / 2)
    return max(step, int(w // step * step)), max(step, int(h // step * step))
