"""Training images and captions in kohya's formats, checked completely before training starts.

Sources
- ``--train_data_dir DIR``: kohya's DreamBooth folder format. Each subfolder ``<repeats>_<class tokens>``
  (``10_shapes``, ``5_sks dog``) holds images (.png .jpg .jpeg .webp .bmp) and, beside each image, a caption
  file ``<stem><caption_extension>``. Subfolders without a ``<repeats>_`` prefix are skipped with a notice,
  as in sd-scripts.
- ``--dataset_config FILE``: kohya's dataset TOML (its DreamBooth schema, ``library/config_util.py``):
  ``[[datasets.subsets]]`` keys ``image_dir``, ``is_reg`` and the subset keys of ``SUBSET_TYPES`` (repeats,
  class tokens, caption and augmentation settings); ``[[datasets]]`` adds ``DATASET_TYPES`` (resolution,
  batch size, bucketing); ``[general]`` may hold any of both. A key is looked up subset -> dataset ->
  general -> command line, as kohya does. Any other key is an error naming it.
- ``--reg_data_dir DIR``: regularisation images in the same folder format (subsets with ``is_reg``); their
  loss is weighted by ``--prior_loss_weight``.

Missing caption (kohya's behaviour, kept): an image without a caption file is captioned with its folder's
class tokens (``5_sks dog`` -> "sks dog"), and a notice counts how many. When there are no class tokens
either (``--dataset_config`` subset without ``class_tokens``), it is an error naming the image.

Images are resized (aspect kept) to cover their bucket and centre-cropped to it (``buckets``: with
``enable_bucket`` a bucket near the image's aspect ratio, else the training resolution). Every image is
decoded once up front, so a corrupt or unreadable file is reported by name before any training time is spent.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import captions as caption_rules
from .buckets import BucketSettings
from .notices import caption_hint

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
# kohya's dataset-config keys and their TOML types (bool is not accepted where an int is meant); one list.
# Subset keys may also stand in [[datasets]] and [general]; their command-line option has the same name.
SUBSET_TYPES = {
    "num_repeats": (int,), "class_tokens": (str,), "caption_extension": (str,), "shuffle_caption": (bool,),
    "keep_tokens": (int,), "flip_aug": (bool,), "keep_tokens_separator": (str,), "caption_separator": (str,),
    "secondary_separator": (str,), "caption_prefix": (str,), "caption_suffix": (str,),
    "caption_dropout_rate": (float, int), "caption_dropout_every_n_epochs": (int,),
    "caption_tag_dropout_rate": (float, int), "resize_interpolation": (str,), "random_crop": (bool,),
    "color_aug": (bool,), "enable_wildcard": (bool,), "token_warmup_min": (int,), "token_warmup_step": (float, int),
    "cache_info": (bool,), "alpha_mask": (bool,),
}
SUBSET_ONLY_TYPES = {"image_dir": (str,), "is_reg": (bool,)}
DATASET_TYPES = {
    "resolution": (int, list, str), "batch_size": (int,), "enable_bucket": (bool,), "min_bucket_reso": (int,),
    "max_bucket_reso": (int,), "bucket_reso_steps": (int,), "bucket_no_upscale": (bool,),
}
KEY_TYPES = {**SUBSET_TYPES, **SUBSET_ONLY_TYPES, **DATASET_TYPES, "subsets": (list,)}
SUBSET_KEYS = set(SUBSET_TYPES) | set(SUBSET_ONLY_TYPES)
DATASET_KEYS = set(SUBSET_TYPES) | set(DATASET_TYPES) | {"subsets"}
GENERAL_KEYS = DATASET_KEYS - {"subsets"}
BUCKET_KEYS = ("enable_bucket", "min_bucket_reso", "max_bucket_reso", "bucket_reso_steps", "bucket_no_upscale")


class DatasetError(ValueError):
    """Bad training data; the message names the file or folder and what would be valid."""


@dataclass
class Subset:
    image_dir: Path
    num_repeats: int = 1
    class_tokens: str | None = None
    caption_extension: str = ".caption"
    shuffle_caption: bool = False
    keep_tokens: int = 0
    flip_aug: bool = False
    keep_tokens_separator: str = ""
    caption_separator: str = ","
    secondary_separator: str | None = None
    caption_prefix: str | None = None
    caption_suffix: str | None = None
    caption_dropout_rate: float = 0.0
    caption_dropout_every_n_epochs: int = 0
    caption_tag_dropout_rate: float = 0.0
    resize_interpolation: str | None = None
    random_crop: bool = False
    color_aug: bool = False
    is_reg: bool = False
    enable_wildcard: bool = False
    token_warmup_min: int = 1
    token_warmup_step: float = 0
    cache_info: bool = False
    alpha_mask: bool = False


@dataclass
class Item:
    image: Path
    caption: str
    subset: Subset
    size: tuple[int, int] = (0, 0)  # the image file's (width, height)
    bucket: tuple[int, int] | None = None  # (width, height) it trains at; set by buckets.assign
    resized: tuple[int, int] | None = None  # its size after resizing, before the centre crop
    num_repeats: int = 1  # the subset's, or more for regularisation images (balance_regularisation)


@dataclass
class DatasetSpec:
    subsets: list[Subset]
    resolution: tuple[int, int] | None = None
    batch_size: int | None = None
    items: list[Item] = field(default_factory=list)
    captions_from_class: int = 0
    buckets: BucketSettings = field(default_factory=BucketSettings)
    bucket_info: dict = field(default_factory=dict)  # kohya's ss_bucket_info, set by buckets.assign_buckets


def subset_defaults(args) -> dict:
    """The subset keys' values from the command line (kohya's lowest-priority fallback)."""
    return {name: getattr(args, name) for name in SUBSET_TYPES
            if name not in ("num_repeats", "class_tokens") and getattr(args, name, None) is not None}


def bucket_settings(values: dict, args) -> BucketSettings:
    """Bucket settings from a config table's values, else the command line, else kohya's defaults."""
    defaults = BucketSettings()

    def pick(key):
        if key in values:
            return values[key]
        given = getattr(args, key, None)
        return getattr(defaults, key) if given is None else given

    return BucketSettings(**{key: pick(key) for key in BUCKET_KEYS})


def subsets_from_folder(train_data_dir: str | Path, args, is_reg: bool = False) -> list[Subset]:
    root = Path(train_data_dir)
    option = "--reg_data_dir" if is_reg else "--train_data_dir"
    if not root.exists():
        raise DatasetError(f"{option} {str(root)!r} does not exist")
    if not root.is_dir():
        raise DatasetError(f"{option} {str(root)!r} is not a folder")
    subsets = []
    for child in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        match = re.fullmatch(r"(\d+)_(.*)", child.name)
        if not match:
            print(f"note: skipping {str(child)!r}: kohya folders are named <repeats>_<class tokens>, e.g. 10_dog")
            continue
        subsets.append(Subset(image_dir=child, num_repeats=int(match.group(1)), class_tokens=match.group(2),
                              is_reg=is_reg, **subset_defaults(args)))
    if not subsets:
        raise DatasetError(
            f"{option} {str(root)!r} has no <repeats>_<class tokens> subfolders (e.g. 10_dog/) with images")
    return subsets


def spec_from_folders(args) -> DatasetSpec:
    """``--train_data_dir`` (+ ``--reg_data_dir``): kohya's DreamBooth folders, settings from the command line."""
    subsets = subsets_from_folder(args.train_data_dir, args)
    if getattr(args, "reg_data_dir", None):
        subsets += subsets_from_folder(args.reg_data_dir, args, is_reg=True)
    return DatasetSpec(subsets=subsets, buckets=bucket_settings({}, args))


TYPE_TEXT = {str: "a quoted string", int: "an integer", bool: "true or false", list: "a list", float: "a number"}


def _check_keys(table: dict, valid: set[str], where: str, path: Path) -> None:
    for key in table:
        if key not in valid:
            raise DatasetError(f"--dataset_config {str(path)!r}: {where} key {key!r} is not supported; "
                               f"valid: {', '.join(sorted(valid))}")
        types = KEY_TYPES.get(key)
        value = table[key]
        if types and (not isinstance(value, types) or (isinstance(value, bool) and bool not in types)):
            raise DatasetError(f"--dataset_config {str(path)!r}: {where} {key} = {value!r} has the wrong type; "
                               f"expected {' or '.join(TYPE_TEXT[t] for t in types)}")


def spec_from_config(path: str | Path, args) -> DatasetSpec:
    import toml

    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"--dataset_config {str(path)!r} does not exist")
    try:
        data = toml.load(path)
    except (toml.TomlDecodeError, UnicodeDecodeError) as e:
        raise DatasetError(f"--dataset_config {str(path)!r} is not valid TOML: {e}") from None
    _check_keys(data, {"general", "datasets"}, "top-level", path)
    general = data.get("general", {})
    datasets = data.get("datasets", [])
    if not isinstance(general, dict):
        raise DatasetError(f"--dataset_config {str(path)!r}: general must be a table ([general]), got {general!r}")
    if not isinstance(datasets, list) or not all(isinstance(d, dict) for d in datasets):
        raise DatasetError(f"--dataset_config {str(path)!r}: datasets must be an array of tables ([[datasets]])")
    _check_keys(general, GENERAL_KEYS, "[general]", path)
    if len(datasets) != 1:
        raise DatasetError(f"--dataset_config {str(path)!r}: found {len(datasets)} [[datasets]]; this trainer "
                           "supports exactly one (put several folders in its [[datasets.subsets]])")
    dataset = datasets[0]
    _check_keys(dataset, DATASET_KEYS, "[[datasets]]", path)
    defaults = subset_defaults(args)
    defaults["num_repeats"] = getattr(args, "dataset_repeats", 1)  # kohya maps --dataset_repeats to num_repeats
    defaults.update({k: v for k, v in general.items() if k in SUBSET_TYPES})
    defaults.update({k: v for k, v in dataset.items() if k in SUBSET_TYPES})
    subsets = []
    for table in dataset.get("subsets", []):
        if not isinstance(table, dict):
            raise DatasetError(f"--dataset_config {str(path)!r}: subsets must be an array of tables "
                               "([[datasets.subsets]])")
        _check_keys(table, SUBSET_KEYS, "[[datasets.subsets]]", path)
        if "image_dir" not in table:
            raise DatasetError(f"--dataset_config {str(path)!r}: a [[datasets.subsets]] has no image_dir")
        image_dir = Path(table["image_dir"])
        if not image_dir.is_dir():
            raise DatasetError(f"--dataset_config {str(path)!r}: image_dir {str(image_dir)!r} is not a folder")
        values = {**defaults, **{k: v for k, v in table.items() if k != "image_dir"}}
        try:
            caption_rules.check_rates(values, "")
            check_interpolation(values.get("resize_interpolation"))
        except ValueError as e:
            raise DatasetError(f"--dataset_config {str(path)!r}: [[datasets.subsets]] {e}") from None
        subsets.append(Subset(image_dir=image_dir, **values))
    if not subsets:
        raise DatasetError(f"--dataset_config {str(path)!r} has no [[datasets.subsets]] with an image_dir")
    resolution = dataset.get("resolution", general.get("resolution"))
    if resolution is not None:
        from .args import ArgumentError, parse_resolution

        try:
            resolution = parse_resolution(resolution)
        except ArgumentError as e:
            raise DatasetError(f"--dataset_config {str(path)!r}: {e}".replace("--resolution", "resolution")) from None
    batch_size = dataset.get("batch_size", general.get("batch_size"))
    buckets = bucket_settings({**{k: v for k, v in general.items() if k in BUCKET_KEYS},
                               **{k: v for k, v in dataset.items() if k in BUCKET_KEYS}}, args)
    return DatasetSpec(subsets=subsets, resolution=resolution, batch_size=batch_size, buckets=buckets)


def _caption(image: Path, subset: Subset) -> tuple[str, bool]:
    path = image.with_name(image.stem + subset.caption_extension)
    if path.is_file():
        try:
            lines = path.read_text(encoding="utf-8").strip().splitlines()
        except UnicodeDecodeError:
            raise DatasetError(f"caption {str(path)!r} is not UTF-8 text") from None
        if lines and lines[0].strip():
            if subset.enable_wildcard:  # kohya: every non-empty line; each sample picks one (captions.py)
                return "\n".join(line.strip() for line in lines if line.strip()), False
            return lines[0].strip(), False
    if subset.class_tokens:
        return subset.class_tokens, True
    raise DatasetError(f"image {str(image)!r} has no caption file {path.name!r} and its subset has no "
                       "class_tokens to fall back on; add the caption or set class_tokens"
                       + caption_hint([image], subset.caption_extension))


def check_image(path: Path) -> tuple[int, int]:
    """Decode ``path`` fully (JPEGs at reduced size) so corrupt files fail here, by name; returns its
    (width, height)."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            size = image.size
            image.draft("RGB", (64, 64))
            image.load()
    except Exception as e:  # PIL raises several types (OSError, SyntaxError, ValueError...)
        raise DatasetError(f"image {str(path)!r} cannot be read: {type(e).__name__}: {e}") from None
    return size


INFO_CACHE_FILE = "metadata_cache.json"  # kohya's DreamBoothDataset.IMAGE_INFO_CACHE_FILE


def read_info_cache(subset: Subset) -> list[tuple[Path, str, tuple[int, int]]] | None:
    """``cache_info``: (image, caption, size) of every image from the subset's ``metadata_cache.json`` (kohya's
    layout: {image path: {"caption": ..., "resolution": [w, h]}}), or None when there is no usable file."""
    import json

    path = subset.image_dir / INFO_CACHE_FILE
    if not subset.cache_info or not path.is_file():
        return None
    try:
        metas = json.loads(path.read_text(encoding="utf-8"))
        return [(Path(image), str(meta["caption"]), (int(meta["resolution"][0]), int(meta["resolution"][1])))
                for image, meta in metas.items()]
    except (ValueError, KeyError, TypeError, IndexError, AttributeError) as e:
        print(f"note: {str(path)!r} cannot be read ({type(e).__name__}: {e}); reading the images instead")
        return None


def write_info_cache(subset: Subset, items: list[Item]) -> None:
    import json

    from .saving import atomic_write

    metas = {str(it.image): {"caption": it.caption, "resolution": list(it.size)} for it in items}
    text = json.dumps(metas, ensure_ascii=False, indent=2)
    atomic_write(subset.image_dir / INFO_CACHE_FILE, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def collect(spec: DatasetSpec) -> DatasetSpec:
    """Fill ``spec.items`` (one per image, sorted) after checking every image and caption.

    With ``cache_info`` (kohya), a subset's images, captions and sizes come from its ``metadata_cache.json``
    when it exists (nothing is opened: kohya leaves checking to the user), and the file is written otherwise.
    """
    items, uncaptioned = [], []
    for subset in spec.subsets:
        cached = read_info_cache(subset)
        if cached is not None:
            items += [Item(image=image, caption=caption, subset=subset, size=size, num_repeats=subset.num_repeats)
                      for image, caption, size in cached]
            print(f"note: image sizes and captions of {str(subset.image_dir)!r} read from {INFO_CACHE_FILE} "
                  "(--cache_info)")
            continue
        first = len(items)
        images = sorted(p for p in subset.image_dir.iterdir()
                        if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
        if not images:
            raise DatasetError(f"folder {str(subset.image_dir)!r} has no images "
                               f"({', '.join(IMAGE_EXTENSIONS)})")
        if not isinstance(subset.num_repeats, int) or subset.num_repeats < 1:
            raise DatasetError(f"folder {str(subset.image_dir)!r}: num_repeats {subset.num_repeats!r} must be >= 1")
        for image in images:
            size = check_image(image)
            caption, from_class = _caption(image, subset)
            spec.captions_from_class += from_class
            if from_class:
                uncaptioned.append((image, subset.caption_extension))
            items.append(Item(image=image, caption=caption, subset=subset, size=size, num_repeats=subset.num_repeats))
        if subset.cache_info:
            write_info_cache(subset, items[first:])
    if spec.captions_from_class:
        print(f"note: {spec.captions_from_class} image(s) have no caption file; using the folder's class tokens "
              "(kohya's behaviour)" + caption_hint([i for i, _ in uncaptioned], uncaptioned[0][1]))
    spec.items = items
    balance_regularisation(items)
    return spec


def balance_regularisation(items: list[Item]) -> None:
    """kohya's DreamBooth rule: regularisation images (repeats included) are used as often as training images
    in an epoch: the first pass takes each with its repeats, later passes add one repeat at a time, in
    order, until the counts match. Fewer regularisation images than training images is fine (they repeat);
    kohya warns about it, so do we."""
    train = sum(it.num_repeats for it in items if not it.subset.is_reg)
    regs = [it for it in items if it.subset.is_reg]
    if not regs:
        return
    if len(regs) < train:
        print(f"note: {len(regs)} regularisation image(s) for {train} training images (repeats included); "
              "they are repeated to match, as kohya does")
    for it in regs:
        it.num_repeats = 0
    n, first = 0, True
    while n < train:
        for it in regs:
            step = it.subset.num_repeats if first else 1
            it.num_repeats += step
            n += step
            if n >= train:
                break
        first = False


# kohya's --resize_interpolation names -> PIL filters ("area" is cv2's INTER_AREA in kohya: PIL's BOX averages
# the same source pixels when shrinking).
INTERPOLATIONS = {"lanczos": "LANCZOS", "nearest": "NEAREST", "bilinear": "BILINEAR", "linear": "BILINEAR",
                  "bicubic": "BICUBIC", "cubic": "BICUBIC", "area": "BOX"}


def check_interpolation(name: str | None) -> None:
    if name is not None and name not in INTERPOLATIONS:
        raise ValueError(f"resize_interpolation {name!r}; valid: {', '.join(INTERPOLATIONS)}")


def resize_filter(name: str | None, size: tuple[int, int], resized: tuple[int, int]):
    """kohya's ``resize_image`` default: area when shrinking (both sides), else lanczos."""
    from PIL import Image

    if name is None:
        name = "area" if size[0] >= resized[0] and size[1] >= resized[1] else "lanczos"
    return getattr(Image.Resampling, INTERPOLATIONS[name])


def load_image(path: Path, width: int, height: int, resized: tuple[int, int] | None = None,
               interpolation: str | None = None, crop_generator: torch.Generator | None = None) -> torch.Tensor:
    """RGB image -> float tensor (3, height, width) in [-1, 1]: resized to ``resized`` (default: the smallest
    size, aspect kept, that covers width x height) with ``resize_filter``, then centre-cropped, or cropped at a
    random place drawn from ``crop_generator`` (kohya's ``trim_and_resize_if_required``, ``random_crop``)."""
    import numpy as np

    image = _fitted(path, "RGB", width, height, resized, interpolation, crop_generator)
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array.copy()).permute(2, 0, 1)


def _fitted(path: Path, mode: str, width: int, height: int, resized: tuple[int, int] | None,
            interpolation: str | None, crop_generator: torch.Generator | None):
    """The image in ``mode``, resized and cropped to width x height as ``load_image`` describes."""
    from PIL import Image

    with Image.open(path) as image:
        image = image.convert(mode)
        if resized is None:
            scale = max(width / image.width, height / image.height)
            resized = (max(width, round(image.width * scale)), max(height, round(image.height * scale)))
        if tuple(resized) != image.size:
            image = image.resize(tuple(resized), resize_filter(interpolation, image.size, tuple(resized)))
        left, top = (resized[0] - width) // 2, (resized[1] - height) // 2
        if crop_generator is not None:
            left = int(torch.randint(0, resized[0] - width + 1, (), generator=crop_generator))
            top = int(torch.randint(0, resized[1] - height + 1, (), generator=crop_generator))
        return image.crop((left, top, left + width, top + height))


def load_item(item: Item, generator: torch.Generator | None = None) -> torch.Tensor:
    """The item's image at its bucket (``buckets.assign`` must have run); a ``random_crop`` subset's crop and a
    ``color_aug`` subset's colour change are drawn from ``generator``."""
    crop = generator if item.subset.random_crop else None
    pixels = load_image(item.image, item.bucket[0], item.bucket[1], item.resized, item.subset.resize_interpolation,
                        crop)
    if item.subset.color_aug and generator is not None:
        pixels = color_aug(pixels, generator)
    return pixels


def load_item_with_mask(item: Item, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(pixels, alpha mask) of the item: ``load_item``'s pixels (same draws) and kohya's ``alpha_mask``, the
    image's alpha channel in [0, 1] at the bucket size with the same resize and crop (1 where it has none)."""
    import numpy as np

    crop = generator if item.subset.random_crop else None
    image = _fitted(item.image, "RGBA", item.bucket[0], item.bucket[1], item.resized, item.subset.resize_interpolation,
                    crop)
    array = np.asarray(image, dtype=np.float32)
    pixels = torch.from_numpy((array[..., :3] / 127.5 - 1.0).copy()).permute(2, 0, 1)
    if item.subset.color_aug and generator is not None:
        pixels = color_aug(pixels, generator)
    return pixels, torch.from_numpy((array[..., 3] / 255.0).copy())


HUE_SHIFT_DEGREES = 16.0  # kohya: ±8 in OpenCV's 0..180 hue units


def color_aug(pixels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """kohya's weak colour augmentation (``AugHelper.color_aug``), on a (3, H, W) image in [-1, 1]: with
    probability 0.33, half the time a hue shift of U(-16°, 16°), else a gamma U(0.95, 1.05). kohya raises the
    0..255 values to the gamma unnormalised (255^1.05 clips), which its comment says replaces albumentations'
    RandomGamma; this applies the gamma to [0, 1] values, as RandomGamma does."""
    draws = torch.rand(3, generator=generator).tolist()
    if draws[0] > 0.33:
        return pixels
    x = ((pixels + 1) / 2).clamp(0, 1)
    if draws[1] > 0.5:
        shift = (draws[2] * 2 - 1) * HUE_SHIFT_DEGREES / 360.0
        r, g, b = x[0], x[1], x[2]
        maxc, _ = x.max(0)
        minc, _ = x.min(0)
        delta = maxc - minc
        safe = torch.where(delta > 0, delta, torch.ones_like(delta))
        hue = torch.where(maxc == r, ((g - b) / safe) % 6, torch.where(maxc == g, (b - r) / safe + 2, (r - g) / safe + 4))
        hue = torch.where(delta > 0, hue / 6.0, torch.zeros_like(hue))
        hue = (hue + shift) % 1.0
        sat = torch.where(maxc > 0, delta / torch.where(maxc > 0, maxc, torch.ones_like(maxc)), torch.zeros_like(maxc))
        x = _hsv_to_rgb(hue, sat, maxc)
    else:
        gamma = 0.95 + draws[2] * 0.1
        x = x ** gamma
    return x * 2 - 1


def _hsv_to_rgb(h: torch.Tensor, s: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    i = torch.floor(h * 6.0)
    f = h * 6.0 - i
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    i = i.long() % 6
    r = torch.stack([v, q, p, p, t, v]).gather(0, i.unsqueeze(0)).squeeze(0)
    g = torch.stack([t, v, v, q, p, p]).gather(0, i.unsqueeze(0)).squeeze(0)
    b = torch.stack([p, p, t, v, v, q]).gather(0, i.unsqueeze(0)).squeeze(0)
    return torch.stack([r, g, b])


def process_caption(caption: str, subset: Subset, generator: torch.Generator, epoch: int = 1, step: int = 0,
                    max_train_steps: int = 0) -> str:
    """kohya's per-sample caption processing (``captions.process_caption``); ``epoch`` counts from 1, ``step``
    is the number of steps done (token warm-up)."""
    return caption_rules.process_caption(caption, subset, generator, epoch, step, max_train_steps)


class Epochs:
    """The sample order: each item ``num_repeats`` times per epoch, shuffled by (seed, epoch) alone.

    With several buckets (kohya's bucketing), each batch comes from one bucket: every bucket's samples are
    shuffled and cut into batches, and the batches are shuffled (kohya's ``shuffle_buckets``).
    Because the order is a pure function of the seed and the epoch number, a resumed run sees the same
    batches as an uninterrupted one without saving any sampler state.
    """

    def __init__(self, items: list[Item], batch_size: int, seed: int):
        self.indices = [i for i, item in enumerate(items) for _ in range(item.num_repeats)]
        self.by_bucket: dict = {}
        for i in self.indices:
            self.by_bucket.setdefault(items[i].bucket, []).append(i)
        self.by_bucket = dict(sorted(self.by_bucket.items(), key=lambda kv: kv[0] or (0, 0)))
        self.batch_size = batch_size
        self.seed = seed

    @property
    def batches_per_epoch(self) -> int:
        return sum(math.ceil(len(group) / self.batch_size) for group in self.by_bucket.values())

    def batches(self, epoch: int) -> list[list[int]]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        if len(self.by_bucket) <= 1:
            order = [self.indices[i] for i in torch.randperm(len(self.indices), generator=generator).tolist()]
            return [order[i:i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        batches = []
        for group in self.by_bucket.values():
            order = [group[i] for i in torch.randperm(len(group), generator=generator).tolist()]
            batches += [order[i:i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        return [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]


def debug_lines(items: list[Item], epochs: Epochs, seed: int) -> list[str]:
    """kohya's ``--debug_dataset`` as text: every batch of the first epoch, each image with its size, bucket
    and the caption as training would see it (drawn with ``seed``); nothing is trained."""
    generator = torch.Generator().manual_seed(seed)
    lines = [f"debug_dataset: {len(items)} images, {len(epochs.indices)} samples per epoch "
             f"(repeats included), {epochs.batches_per_epoch} batches of up to {epochs.batch_size}"]
    for step, batch in enumerate(epochs.batches(0), start=1):
        for i in batch:
            item = items[i]
            w, h = item.size
            bw, bh = item.bucket or item.size
            reg = ", regularisation" if item.subset.is_reg else ""
            caption = process_caption(item.caption, item.subset, generator, 1)
            lines.append(f"epoch 1, step {step}: {item.image} ({w}x{h} -> bucket {bw}x{bh}{reg}): {caption!r}")
    return lines
