"""One-line notices about data that trains, but probably not as the user meant (kohya is silent on these).

- an image upscaled a lot (an 8x8 icon trained at 512x512 is mostly interpolation);
- captions missing under ``--caption_extension`` while caption files with another extension sit next to the
  images (kohya's default is ``.caption``; most datasets use ``.txt``).
"""

from __future__ import annotations

from pathlib import Path

UPSCALE_NOTICE = 4.0  # an image scaled up more than this (per side) gets the notice
CAPTION_EXTENSIONS = (".txt", ".caption")


def upscale_factor(size: tuple[int, int], target: tuple[int, int]) -> float:
    """How much an image of ``size`` (w, h) is scaled up to cover ``target`` (w, h) before the centre crop."""
    w, h = size
    if w <= 0 or h <= 0:
        return 1.0
    return max(target[0] / w, target[1] / h)


def upscale_notice(items, resolution: tuple[int, int]) -> str | None:
    """The notice for images scaled up more than ``UPSCALE_NOTICE`` x to their bucket (or ``resolution``)."""
    big = [(upscale_factor(it.size, it.bucket or resolution), it) for it in items]
    big = [(f, it) for f, it in big if f > UPSCALE_NOTICE]
    if not big:
        return None
    factor, worst = max(big, key=lambda pair: pair[0])
    w, h = worst.bucket or resolution
    return (f"note: {len(big)} image(s) are upscaled more than {UPSCALE_NOTICE:g}x to the training size (e.g. "
            f"{worst.image.name}: {worst.size[0]}x{worst.size[1]} -> {w}x{h}, {factor:.0f}x); they train as blurry "
            "enlargements: use larger images or a smaller --resolution")


def caption_hint(images: list[Path], extension: str) -> str:
    """`` (...)`` naming caption files with another extension beside ``images``, or "" when there are none."""
    found: dict[str, list[Path]] = {}
    for image in images:
        for other in CAPTION_EXTENSIONS:
            path = image.with_name(image.stem + other)
            if other != extension and path.is_file():
                found.setdefault(other, []).append(path)
    if not found:
        return ""
    other, paths = max(found.items(), key=lambda kv: len(kv[1]))
    return (f" ({len(paths)} {other} file(s) sit next to them, e.g. {paths[0].name}: "
            f"add --caption_extension {other} (kohya's default is .caption))")
