"""Latent caching (``--cache_latents``, ``--cache_latents_to_disk``), in kohya sd-scripts' file format.

Every image is encoded once before training, at its bucket, in batches of one bucket of at most
``--vae_batch_size`` images (kohya's default 1). Images of subsets with
``flip_aug`` are also encoded flipped (the flipped image, not a flipped latent), as kohya does.

``--cache_latents_to_disk`` writes, beside each image, kohya's ``.npz`` (``strategy_sd.py``:
``<stem>_<W>x<H>_sd.npz`` with the image file's size, ``_sdxl.npz`` for SDXL) with kohya's keys:
``latents`` (C, H/8, W/8, float32, the VAE's sample before ``scaling_factor``), ``original_size`` (W, H),
``crop_ltrb`` and, with flip_aug, ``latents_flipped``. A file is reused when it has these keys and its
latents have the bucket's shape (kohya's older ``is_disk_cached_latents_is_expected`` check, which also
catches a changed resolution or bucket); otherwise it is encoded again and rewritten (atomically). kohya's
oldest name, ``<stem>.npz``, is read when present, as kohya does.
"""

from __future__ import annotations

from pathlib import Path

import torch

from . import dataset as data
from .buckets import crop_ltrb

def npz_path(item, sdxl: bool) -> Path:
    old = item.image.with_suffix(".npz")
    if old.is_file():
        return old
    w, h = item.size
    return item.image.with_name(f"{item.image.stem}_{w:04d}x{h:04d}{'_sdxl' if sdxl else '_sd'}.npz")


def read_valid(path: Path, bucket: tuple[int, int], flip: bool, skip_check: bool = False):
    """(latents, flipped or None) from ``path`` when it is a valid cache for ``bucket``, else None.
    ``skip_check`` (kohya's ``--skip_cache_check``): any existing file is taken as it is."""
    import numpy as np

    if not path.is_file():
        return None
    try:
        with np.load(path) as npz:
            latents = npz["latents"]
            if skip_check:
                flipped = npz["latents_flipped"] if flip and "latents_flipped" in npz.files else None
                return torch.from_numpy(latents.copy()), None if flipped is None else torch.from_numpy(flipped.copy())
            if not {"latents", "original_size", "crop_ltrb"} <= set(npz.files):
                return None
            expected = (bucket[1] // 8, bucket[0] // 8)
            if latents.shape[1:3] != expected:
                return None
            flipped = None
            if flip:
                if "latents_flipped" not in npz.files or npz["latents_flipped"].shape[1:3] != expected:
                    return None
                flipped = torch.from_numpy(npz["latents_flipped"].copy())
            return torch.from_numpy(latents.copy()), flipped
    except Exception as e:  # truncated or foreign file (BadZipFile, EOFError, OSError, ...): encode again
        print(f"note: latent cache {str(path)!r} cannot be read ({type(e).__name__}); encoding again")
        return None


def write(path: Path, latents: torch.Tensor, flipped: torch.Tensor | None, item) -> None:
    import numpy as np

    from .saving import atomic_write

    arrays = {"latents": latents.float().cpu().numpy(), "original_size": np.array(item.size),
              "crop_ltrb": np.array(crop_ltrb(item.bucket, item.size))}
    if flipped is not None:
        arrays["latents_flipped"] = flipped.float().cpu().numpy()

    def save(tmp):
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)

    atomic_write(path, save)


class LatentCache:
    """The scaled latents of every item (and of its flipped image, for flip_aug subsets)."""

    def __init__(self, latents: list[torch.Tensor], flipped: list[torch.Tensor | None], scaling_factor: float):
        self.latents = latents
        self.flipped = flipped
        self.scaling_factor = scaling_factor

    def batch(self, indices: list[int], flips: list[bool]) -> torch.Tensor:
        rows = [self.flipped[i] if f and self.flipped[i] is not None else self.latents[i]
                for i, f in zip(indices, flips)]
        return torch.stack(rows) * self.scaling_factor


def build(items, vae, generator: torch.Generator, device, to_disk: bool, sdxl: bool,
          skip_check: bool = False, vae_batch_size: int = 1) -> tuple[LatentCache, dict]:
    """Encode (or, with ``to_disk``, read valid ``.npz`` files for) every item; returns the cache and counts
    ``{"encoded": n, "reused": n}``. The VAE samples its latent with ``generator`` (mean + std * noise)."""
    from .errors import ArgumentError

    for name in ("random_crop", "color_aug"):
        changing = next((it.subset for it in items if getattr(it.subset, name)), None)
        if changing is not None:
            raise ArgumentError(f"--cache_latents cannot be used with {name} (subset {str(changing.image_dir)!r}): "
                                "a cached latent has one crop and colour; kohya refuses the same. Remove one of them")
    latents: list = [None] * len(items)
    flipped: list = [None] * len(items)
    todo: dict = {}
    reused = 0
    for i, item in enumerate(items):
        if to_disk:
            found = read_valid(npz_path(item, sdxl), item.bucket, item.subset.flip_aug, skip_check)
            if found is not None:
                latents[i], flipped[i] = found
                reused += 1
                continue
        todo.setdefault(item.bucket, []).append(i)

    def encode(pixels):
        dist = vae.encode(pixels.to(device, torch.float32)).latent_dist
        noise = torch.randn(dist.mean.shape, generator=generator).to(device)
        return (dist.mean + dist.std * noise).float().cpu()

    with torch.no_grad():
        for bucket, indices in todo.items():
            for start in range(0, len(indices), vae_batch_size):
                chunk = indices[start:start + vae_batch_size]
                pixels = torch.stack([data.load_item(items[i]) for i in chunk])
                encoded = encode(pixels)
                flips = [i for i in chunk if items[i].subset.flip_aug]
                encoded_flipped = encode(torch.stack([pixels[chunk.index(i)].flip(-1) for i in flips])) if flips else []
                for k, i in enumerate(chunk):
                    latents[i] = encoded[k]
                for k, i in enumerate(flips):
                    flipped[i] = encoded_flipped[k]
                if to_disk:
                    for i in chunk:
                        write(npz_path(items[i], sdxl), latents[i], flipped[i], items[i])
    encoded_count = sum(len(v) for v in todo.values())
    return LatentCache(latents, flipped, vae.config.scaling_factor), {"encoded": encoded_count, "reused": reused}
