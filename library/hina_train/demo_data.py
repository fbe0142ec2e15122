"""The built-in demo dataset: a few dozen small captioned images of coloured shapes, in kohya folder format.

``make_demo_dataset(root)`` writes ``root/<repeats>_shapes/NNN.png`` + ``NNN.txt`` ("a red circle on a blue
background"). The content is a pure function of the seed, so every run (and every machine) trains on the same
bytes. Files are written to a temporary folder that is renamed into place, so an interrupted run never leaves
a half-made dataset behind; an existing complete dataset is reused.
"""

from __future__ import annotations

import os
import random
import shutil
import tempfile
from pathlib import Path

COLORS = {
    "red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 70, 220), "yellow": (235, 210, 40),
    "purple": (140, 50, 170), "orange": (240, 140, 30), "white": (245, 245, 245), "black": (20, 20, 20),
}
SHAPES = ("circle", "square", "triangle")
CLASS_NAME = "shapes"
REPEATS = 1
NUM_IMAGES = 32
SIZE = 64
DONE_MARKER = ".complete"
# The demo's sample prompt file (kohya's format), in the checkout's configs/ beside demo.toml.
DEMO_PROMPTS = Path(__file__).resolve().parents[2] / "configs" / "demo_prompts.txt"


def caption_words() -> list[str]:
    """Every word a demo caption can contain (the tiny tokenizer gives each its own token)."""
    return ["a", "on", "background", CLASS_NAME, *COLORS, *SHAPES]


def draw_shape(draw, shape: str, fg, rng: random.Random, size: int, half_range: tuple[int, int]) -> None:
    """A filled circle, square or triangle, or a ring, of random half-width ``half_range`` placed at random
    on a ``size`` x ``size`` PIL canvas (also draws the benchmark tasks' images, ``benchmarks/tasks.py``)."""
    half = rng.randint(*half_range)
    cx, cy = rng.randint(half, size - half), rng.randint(half, size - half)
    box = (cx - half, cy - half, cx + half, cy + half)
    if shape == "circle":
        draw.ellipse(box, fill=fg)
    elif shape == "square":
        draw.rectangle(box, fill=fg)
    elif shape == "triangle":
        draw.polygon([(cx, cy - half), (cx - half, cy + half), (cx + half, cy + half)], fill=fg)
    elif shape == "ring":
        draw.ellipse(box, outline=fg, width=max(5, half // 3))
    else:
        raise ValueError(f"unknown shape {shape!r} (valid: circle, square, triangle, ring)")


def _draw(shape: str, fg, bg, rng: random.Random):
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (SIZE, SIZE), bg)
    draw_shape(ImageDraw.Draw(image), shape, fg, rng, SIZE, (14, 22))
    return image


def make_demo_dataset(root: Path, seed: int = 0, num_images: int = NUM_IMAGES) -> Path:
    """Create (or reuse) the demo dataset under ``root``; returns ``root`` (the kohya ``--train_data_dir``)."""
    root = Path(root)
    if (root / DONE_MARKER).is_file():
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    names = list(COLORS)
    staging = Path(tempfile.mkdtemp(dir=root.parent, prefix=f".{root.name}."))
    staging.chmod(0o755)  # mkdtemp makes it private; the dataset is an ordinary folder
    try:
        folder = staging / f"{REPEATS}_{CLASS_NAME}"
        folder.mkdir()
        for i in range(num_images):
            shape = SHAPES[i % len(SHAPES)]
            fg_name, bg_name = rng.sample(names, 2)
            _draw(shape, COLORS[fg_name], COLORS[bg_name], rng).save(folder / f"{i:03d}.png")
            (folder / f"{i:03d}.txt").write_text(f"a {fg_name} {shape} on a {bg_name} background\n")
        (staging / DONE_MARKER).write_text("ok\n")
        if root.exists():
            shutil.rmtree(root)  # an incomplete earlier attempt (no marker)
        os.replace(staging, root)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return root
