"""Aspect-ratio bucketing as kohya sd-scripts does it (``library/train_util.py`` ``BucketManager``).

Each image goes to a bucket: a (width, height) resolution close to the image's aspect ratio. The image is
resized, aspect kept, until it covers the bucket, then centre-cropped to it, so a 1024x256 image trains as
a wide image instead of losing three quarters of its width to a square crop. A batch is drawn from one
bucket (all its images have the same size).

- Predefined buckets (``enable_bucket``, default): ``make_bucket_resolutions`` lists sizes of about the
  training resolution's area: widths from ``min_bucket_reso`` to ``max_bucket_reso`` in steps of
  ``bucket_reso_steps``, height = area / width rounded down to the step (both orientations), plus the
  square. An image takes the bucket whose aspect ratio is nearest to its own.
- ``bucket_no_upscale``: no predefined list; an image larger than the training area is scaled down to
  that area (aspect kept, one side rounded to the step), a smaller one keeps its size, and the bucket is
  the size rounded down to the step (cropping, never padding). min/max_bucket_reso are ignored (kohya
  warns the same).
- Bucketing off: one bucket, the training resolution; every image is scaled to cover it and centre-cropped.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .errors import ArgumentError


class BucketError(ArgumentError):
    """Bad bucket settings; the message names the value and what would be valid."""


@dataclass(frozen=True)
class BucketSettings:
    enable_bucket: bool = False
    min_bucket_reso: int = 256
    max_bucket_reso: int = 1024
    bucket_reso_steps: int = 64
    bucket_no_upscale: bool = False

    def checked(self, resolution: tuple[int, int], multiple: int, where: str = "") -> "BucketSettings":
        """kohya's checks, as one-line errors instead of asserts; returns the settings with min/max moved to
        multiples of ``bucket_reso_steps`` (kohya adjusts them with a warning, so do we). ``multiple``: what the
        UNet needs (kohya: 64 for SD 1/2, 32 for SDXL; here 8 x 2^(UNet levels - 1), so also the tiny model's
        16). ``where`` prefixes the message."""
        if not self.enable_bucket:
            return self
        for name in ("min_bucket_reso", "max_bucket_reso", "bucket_reso_steps"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise BucketError(f"{where}{name} {value!r} must be a positive integer")
        steps = self.bucket_reso_steps
        if steps % multiple:
            raise BucketError(f"{where}bucket_reso_steps {steps} must be divisible by {multiple} for this model "
                              f"(the VAE and the UNet's downsampling); e.g. {max(multiple, 64 // multiple * multiple)}")
        if self.bucket_no_upscale:
            return self
        low = self.min_bucket_reso - self.min_bucket_reso % steps
        high = self.max_bucket_reso + (-self.max_bucket_reso) % steps
        for name, old, new in (("min_bucket_reso", self.min_bucket_reso, low),
                               ("max_bucket_reso", self.max_bucket_reso, high)):
            if old != new:
                print(f"note: {where}{name} adjusted to a multiple of bucket_reso_steps {steps}: {old} -> {new}")
        if min(resolution) < low:
            raise BucketError(f"{where}min_bucket_reso {self.min_bucket_reso} is larger than the resolution "
                              f"{resolution[0]},{resolution[1]}; lower it to at most {min(resolution)}")
        if max(resolution) > high:
            raise BucketError(f"{where}max_bucket_reso {self.max_bucket_reso} is smaller than the resolution "
                              f"{resolution[0]},{resolution[1]}; raise it to at least {max(resolution)}")
        return BucketSettings(True, low, high, steps, False)


def make_bucket_resolutions(max_reso: tuple[int, int], min_size: int, max_size: int,
                            divisible: int) -> list[tuple[int, int]]:
    """kohya's ``model_util.make_bucket_resolutions``: sizes of about ``max_reso``'s area, sorted."""
    max_area = max_reso[0] * max_reso[1]
    side = int(math.sqrt(max_area) // divisible) * divisible
    resos = {(side, side)}
    width = min_size
    while width <= max_size:
        height = min(max_size, int((max_area // width) // divisible) * divisible)
        if height >= min_size:
            resos.add((width, height))
            resos.add((height, width))
        width += divisible
    return sorted(resos)


def _round_to_steps(x: float, steps: int) -> int:
    x = int(x + 0.5)
    return x - x % steps


def select_bucket(image_size: tuple[int, int], resolution: tuple[int, int], settings: BucketSettings,
                  predefined: list[tuple[int, int]] | None) -> tuple[tuple[int, int], tuple[int, int]]:
    """(bucket, resized size) of an image of ``image_size`` (width, height), as kohya's ``select_bucket``.

    ``predefined``: the candidate buckets (``make_bucket_resolutions``, or ``[resolution]`` with bucketing
    off); ``None`` with ``bucket_no_upscale``.
    """
    width, height = image_size
    aspect = width / height
    if predefined is not None:
        if (width, height) in predefined:
            reso = (width, height)
        else:
            reso = min(predefined, key=lambda r: abs(r[0] / r[1] - aspect))
        if aspect > reso[0] / reso[1]:  # wider than the bucket: fit the height, crop the width
            scale = reso[1] / height
        else:
            scale = reso[0] / width
        return reso, (int(width * scale + 0.5), int(height * scale + 0.5))
    steps = settings.bucket_reso_steps
    max_area = resolution[0] * resolution[1]
    if width * height > max_area:
        resized_w = math.sqrt(max_area * aspect)
        resized_h = max_area / resized_w
        w_rounded = _round_to_steps(resized_w, steps)
        h_in_w = _round_to_steps(w_rounded / aspect, steps)
        h_rounded = _round_to_steps(resized_h, steps)
        w_in_h = _round_to_steps(h_rounded * aspect, steps)
        if h_in_w and abs(w_rounded / h_in_w - aspect) < abs(w_in_h / max(h_rounded, 1) - aspect):
            resized = (w_rounded, int(w_rounded / aspect + 0.5))
        else:
            resized = (int(h_rounded * aspect + 0.5), h_rounded)
    else:
        resized = (width, height)
    bucket = (resized[0] - resized[0] % steps, resized[1] - resized[1] % steps)
    if min(bucket) < steps:
        raise BucketError(f"an image of {width}x{height} is smaller than bucket_reso_steps {steps} on one side "
                          "with bucket_no_upscale; use a larger image or a smaller bucket_reso_steps")
    return bucket, resized


def crop_ltrb(bucket: tuple[int, int], image_size: tuple[int, int]) -> tuple[int, int, int, int]:
    """kohya's ``get_crop_ltrb``: where the image lies in the bucket after the centre crop (SDXL's crop
    conditioning uses left and top)."""
    bucket_ar = bucket[0] / bucket[1]
    image_ar = image_size[0] / image_size[1]
    if bucket_ar > image_ar:
        resized_w, resized_h = bucket[1] * image_ar, bucket[1]
    else:
        resized_w, resized_h = bucket[0], bucket[0] / image_ar
    left = (bucket[0] - resized_w) // 2
    top = (bucket[1] - resized_h) // 2
    return int(left), int(top), int(left + resized_w), int(top + resized_h)


def assign(items, resolution: tuple[int, int], settings: BucketSettings) -> dict[tuple[int, int], int]:
    """Set ``item.bucket`` and ``item.resized`` for every item (each has ``item.size``); returns the image
    count per bucket (repeats included), sorted by resolution, as kohya prints it."""
    if not settings.enable_bucket:
        predefined = [tuple(resolution)]
    elif settings.bucket_no_upscale:
        predefined = None
    else:
        predefined = make_bucket_resolutions(resolution, settings.min_bucket_reso, settings.max_bucket_reso,
                                             settings.bucket_reso_steps)
    counts: dict[tuple[int, int], int] = {}
    for item in items:
        item.bucket, item.resized = select_bucket(item.size, resolution, settings, predefined)
        counts[item.bucket] = counts.get(item.bucket, 0) + item.num_repeats
    return dict(sorted(counts.items()))


def describe(counts: dict[tuple[int, int], int]) -> str:
    """kohya's bucket report, one line per bucket."""
    return "\n".join(f"bucket {i}: resolution {reso}, count: {n}" for i, (reso, n) in enumerate(counts.items()))


def unet_multiple(unet) -> int:
    """The pixel multiple a UNet needs: the VAE's 8 times 2 per downsampling level (SD 1/2: 64, SDXL: 32)."""
    levels = len(getattr(unet.config, "block_out_channels", (0, 0, 0, 0)))
    return 8 * 2 ** max(levels - 1, 0)


def assign_buckets(spec, resolution: tuple[int, int], unet) -> dict[tuple[int, int], int]:
    """Check ``spec.buckets`` against the resolution and the model, put every item in its bucket, print
    kohya's bucket report when bucketing is on; returns the counts per bucket."""
    if spec.buckets.bucket_no_upscale and not spec.buckets.enable_bucket:
        print("note: bucket_no_upscale has no effect without enable_bucket (kohya's behaviour); add enable_bucket")
    settings = spec.buckets.checked(tuple(resolution), unet_multiple(unet))
    if settings.enable_bucket and settings.bucket_no_upscale:
        print("note: min_bucket_reso and max_bucket_reso are ignored with bucket_no_upscale (kohya's behaviour)")
    counts = assign(spec.items, tuple(resolution), settings)
    if settings.enable_bucket:
        print("number of images (including repeats) per bucket:\n" + describe(counts))
        errors = [abs(it.bucket[0] / it.bucket[1] - it.size[0] / it.size[1]) for it in spec.items]
        spec.bucket_info = {"buckets": {i: {"resolution": list(reso), "count": n}
                                        for i, (reso, n) in enumerate(counts.items())},
                            "mean_img_ar_error": sum(errors) / len(errors) if errors else 0.0}
    spec.buckets = settings
    return counts
