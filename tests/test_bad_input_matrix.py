"""The bad-input matrix (issue 7): every bad input tried, and the message (or handling) it gets.

``CASES`` is the single list; ``benchmarks/bad_input_table.py`` runs it and writes docs/BAD_INPUT.md, and
``test_doc_lists_every_case`` keeps the two in sync. A case is an error case (an exception type and a regex
its message must match) or a handled case (``expect=None``: the call returns a short description of what
happened, and must not raise). Trainer cases run the real command path (``cli.run``) up to its set-up
checks; none reaches training.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import torch

DEMO_SAMPLES = False  # the built-in demo trains without sample images here (conftest); none is checked

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Case:
    area: str
    id: str
    what: str
    run: Callable[[Path], object]   # gets a fresh temp folder
    expect: type | None             # exception type, or None for handled input
    match: str = ""


# --- helpers ----------------------------------------------------------------------------------------------
def _p(*shape, dtype=torch.float32):
    return torch.nn.Parameter(torch.randn(*shape).to(dtype))


def _step(cls, params, **kw):
    opt = cls(params, **kw)
    flat = [p for g in opt.param_groups for p in g["params"]]
    for _ in range(2):
        for p in flat:
            p.grad = torch.ones_like(p)
        opt.step()
    finite = all(torch.isfinite(p.float()).all() for p in flat)
    assert finite, "non-finite parameter after a step"
    return f"steps; shapes {[tuple(p.shape) for p in flat]}, dtypes {sorted({str(p.dtype)[6:] for p in flat})}, finite"


def _opt(name, args=(), params=None):
    from library.hina.registry import create_optimizer

    return create_optimizer(name, params or [_p(4, 4)], 1e-3, list(args))


def _recipe(text):
    def run(tmp):
        from library.hina.presets import load_recipe

        path = tmp / "recipe.toml"
        path.write_text(text)
        return load_recipe(path)
    return run


def _data(tmp, folder="2_sks dog", n=2, captions=True, size=(40, 48)):
    from PIL import Image

    sub = tmp / "data" / folder
    sub.mkdir(parents=True)
    for i in range(n):
        Image.new("RGB", size, (10 * i, 80, 160)).save(sub / f"{i}.png")
        if captions:
            (sub / f"{i}.txt").write_text(f"photo {i}\n")
    return tmp / "data"


def _dataset_config(text_fn):
    def run(tmp):
        from library.hina_train.args import parse_args
        from library.hina_train.dataset import collect, spec_from_config

        data = _data(tmp)
        path = tmp / "dataset.toml"
        path.write_text(text_fn(str(data / "2_sks dog")))
        return collect(spec_from_config(path, parse_args([])))
    return run


def _one_subset(general: str = "", dataset: str = "", subset: str = "", image_dir: str | None = "{d}"):
    """A dataset config with one [[datasets]] and one subset (image_dir = the test folder unless given)."""
    def text(d):
        lines = ["[general]", general] if general else []
        lines += ["[[datasets]]", *([dataset] if dataset else []), "[[datasets.subsets]]"]
        if image_dir is not None:
            lines.append(f'image_dir = "{image_dir.format(d=d)}"')
        return "\n".join(lines + ([subset] if subset else [])) + "\n"
    return _dataset_config(text)


def _collect(prepare):
    """Build a kohya folder, let ``prepare`` spoil it, then collect it as --train_data_dir."""
    def run(tmp):
        from library.hina_train.args import parse_args
        from library.hina_train.dataset import DatasetSpec, collect, subsets_from_folder

        data = _data(tmp)
        prepare(data / "2_sks dog")
        args = parse_args(["--train_data_dir", str(data), "--caption_extension", ".txt"])
        spec = collect(DatasetSpec(subsets=subsets_from_folder(data, args)))
        return f"{len(spec.items)} images; captions {[it.caption for it in spec.items]}"
    return run


def _cli(argv_fn):
    def run(tmp):
        from library.hina_train import cli, loop

        real = loop.train
        loop.train = lambda plan: "reached training"
        try:
            return cli.run(list(argv_fn(tmp)) + ["--output_dir", str(tmp / "out")])
        finally:
            loop.train = real
    return run


def _weights(kind):
    def argv(tmp):
        from safetensors.torch import save_file

        data = _data(tmp)
        path = tmp / "w.safetensors"
        if kind == "garbage":
            path.write_bytes(b"not a safetensors file at all")
        elif kind == "other":
            save_file({"model.diffusion_model.x": torch.zeros(2)}, str(path))
        return ["--train_data_dir", str(data), "--caption_extension", ".txt", "--network_weights", str(path)]
    return argv


def _write(name, content: bytes):
    return lambda folder: (folder / name).write_bytes(content)


def _image(name, mode, size):
    def prepare(folder):
        from PIL import Image

        Image.new(mode, size).save(folder / name)
    return prepare


# --- the matrix -------------------------------------------------------------------------------------------
from library.hina import (AdamW_HinaAdaptive, AdamWBF16_HinaAdaptive, Automagic_CameAMP,  # noqa: E402
                          Automagic_CameAMP8bit, HinaAdamW)
from library.hina.presets import RecipeError  # noqa: E402
from library.hina.registry import OptimizerArgsError, UnknownOptimizerError  # noqa: E402
from library.hina_train.args import ArgumentError  # noqa: E402
from library.hina_train.dataset import DatasetError  # noqa: E402
from library.hina_train.saving import SaveError  # noqa: E402

def _printed(fn):
    """A handled case whose outcome is what it printed (notices)."""
    def run(tmp):
        import contextlib
        import io

        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            fn(tmp)
        return out.getvalue().strip() or "(nothing printed)"
    return run


def _foreign_network_module(tmp):
    """A network module that fails as LyCORIS' kohya module does with its default preset on some models."""
    import sys

    (tmp / "foreign_net.py").write_text(
        "def create_network(*a, **k):\n    assert False, 'duplicated lora name: lora_unet_conv_in'\n")
    sys.path.insert(0, str(tmp))
    sys.modules.pop("foreign_net", None)
    try:
        return _cli(lambda t: ["--network_module", "foreign_net", "--max_train_steps", "1"])(tmp)
    finally:
        sys.path.remove(str(tmp))
        sys.modules.pop("foreign_net", None)


def _disk_full(tmp):
    import errno

    from library.hina_train.saving import atomic_write

    path = tmp / "demo.safetensors"
    path.write_bytes(b"the last good save")

    def write(tmp_path):
        Path(tmp_path).write_bytes(b"x" * 4096)
        raise OSError(errno.ENOSPC, "No space left on device")

    try:
        atomic_write(path, write, needed_bytes=3 * 2**20)
    finally:
        assert path.read_bytes() == b"the last good save" and [p.name for p in tmp.iterdir()] == [path.name]


def _resume_finished(tmp):
    from library.hina_train.args import parse_args
    from library.hina_train.trainer import check_resume_has_work

    args = parse_args(["--resume", str(tmp / "demo-state"), "--max_train_epochs", "2"])
    check_resume_has_work(args, {"global_step": 8}, 4)


def _uncaptioned_txt(tmp):
    from library.hina_train.args import parse_args
    from library.hina_train.dataset import DatasetSpec, collect, subsets_from_folder

    data = _data(tmp)
    collect(DatasetSpec(subsets=subsets_from_folder(data, parse_args(["--train_data_dir", str(data)]))))


def _tiny_image(tmp):
    from types import SimpleNamespace

    from library.hina_train.notices import upscale_notice

    print(upscale_notice([SimpleNamespace(image=Path("icon.png"), size=(8, 8), bucket=None)], (512, 512)))


CASES = [
    # optimizer names
    Case("optimizer name", "typo", "--optimizer_type HinaAdamX", lambda t: _opt("HinaAdamX"),
         UnknownOptimizerError, r"Unknown optimizer 'HinaAdamX'; closest names: .*HinaAdamW"),
    Case("optimizer name", "empty", "--optimizer_type ''", lambda t: _opt(""),
         UnknownOptimizerError, "must be a non-empty string"),
    Case("optimizer name", "bad-module", "dotted path to a missing module", lambda t: _opt("nosuch.module.Opt"),
         UnknownOptimizerError, r"cannot import 'nosuch.module'"),
    Case("optimizer name", "bad-class", "dotted path to a missing class", lambda t: _opt("torch.optim.NoSuch"),
         UnknownOptimizerError, r"torch.optim has no class 'NoSuch'"),
    Case("optimizer name", "case", "different case (hinaadamw)", lambda t: type(_opt("hinaadamw")).__name__,
         None),
    # optimizer_args
    Case("optimizer_args", "no-equals", "use_spd", lambda t: _opt("HinaAdamW", ["use_spd"]),
         OptimizerArgsError, "has no '='"),
    Case("optimizer_args", "unknown-key", "spd_lamda=0.1", lambda t: _opt("HinaAdamW", ["spd_lamda=0.1"]),
         OptimizerArgsError, "has no argument 'spd_lamda'; did you mean spd_lambda"),
    Case("optimizer_args", "unquoted-string", "use_spd=maybe", lambda t: _opt("HinaAdamW", ["use_spd=maybe"]),
         OptimizerArgsError, "needs quotes"),
    Case("optimizer_args", "wrong-type", "weight_decay='high'",
         lambda t: _opt("HinaAdamW", ["weight_decay='high'"]), OptimizerArgsError, "expected a number"),
    Case("optimizer_args", "bool-type", "use_spd=1", lambda t: _opt("HinaAdamW", ["use_spd=1"]),
         OptimizerArgsError, "True or False"),
    Case("optimizer_args", "tuple-length", "betas=(0.9,)", lambda t: _opt("HinaAdamW", ["betas=(0.9,)"]),
         OptimizerArgsError, "tuple of 2"),
    Case("optimizer_args", "lr", "lr=0.1", lambda t: _opt("HinaAdamW", ["lr=0.1"]),
         OptimizerArgsError, "set the learning rate with --learning_rate"),
    Case("optimizer_args", "twice", "eps=1e-8 eps=1e-6", lambda t: _opt("HinaAdamW", ["eps=1e-8", "eps=1e-6"]),
         OptimizerArgsError, "gives 'eps' twice"),
    Case("optimizer_args", "out-of-range", "optim_bits=4", lambda t: _opt("HinaAdamW", ["optim_bits=4"]),
         ValueError, r"Invalid optim_bits: 4 \(valid: 8 or 32\)"),
    Case("optimizer_args", "negative", "spd_lambda=-1", lambda t: _opt("HinaAdamW", ["spd_lambda=-1"]),
         ValueError, "Invalid spd_lambda: -1"),
    Case("optimizer_args", "trainer", "--optimizer_args spd_lamda=0.1 on the command line",
         _cli(lambda t: ["--train_data_dir", str(_data(t)), "--caption_extension", ".txt",
                         "--optimizer_args", "spd_lamda=0.1"]),
         ArgumentError, "--optimizer_type 'HinaAdamW': optimizer_args: HinaAdamW has no argument 'spd_lamda'"),
    # TOML recipes
    Case("recipe", "syntax", "a line without '='", _recipe('optimizer_type = "HinaAdamW"\nlearning_rate 1e-4\n'),
         RecipeError, r"recipe\.toml':2:\d+: invalid TOML"),
    Case("recipe", "unclosed", "an unclosed string", _recipe('optimizer_type = "HinaAdamW\nlearning_rate = 1\n'),
         RecipeError, r"recipe\.toml':1:\d+: invalid TOML"),
    Case("recipe", "unknown-key", "learning_rat = 1e-4",
         _recipe('optimizer_type = "HinaAdamW"\nlearning_rate = 1e-4\nlearning_rat = 1e-4\n'),
         RecipeError, "learning_rat"),
    Case("recipe", "wrong-type", 'learning_rate = "fast"',
         _recipe('optimizer_type = "HinaAdamW"\nlearning_rate = "fast"\n'),
         RecipeError, "learning_rate must be a number"),
    Case("recipe", "args-type", 'optimizer_args = "use_spd=True"',
         _recipe('optimizer_type = "HinaAdamW"\nlearning_rate = 1e-4\noptimizer_args = "use_spd=True"\n'),
         RecipeError, 'optimizer_args must be a list of "k=v" strings'),
    Case("recipe", "missing", "no optimizer_type", _recipe('learning_rate = 1e-4\n'),
         RecipeError, "missing optimizer_type"),
    Case("recipe", "twice", "a key in two sections",
         _recipe('[a]\noptimizer_type = "HinaAdamW"\nlearning_rate = 1\n[b]\nlearning_rate = 2\n'),
         RecipeError, "'learning_rate' is set twice"),
    Case("recipe", "no-file", "a recipe that does not exist", lambda t: __import__(
        "library.hina.presets", fromlist=["x"]).load_recipe(t / "none.toml"), RecipeError, r"recipe .*none\.toml' does not exist"),
    # --config_file
    Case("config file", "syntax", "--config_file with a syntax error",
         _cli(lambda t: (t.joinpath("c.toml").write_text("max_train_steps = = 3\n"), ["--config_file", str(t / "c.toml")])[1]),
         ArgumentError, r"c\.toml':1:\d+: invalid TOML"),
    Case("config file", "unknown-key", "--config_file with an unknown key",
         _cli(lambda t: (t.joinpath("c.toml").write_text("max_train_stepz = 3\n"), ["--config_file", str(t / "c.toml")])[1]),
         ArgumentError, "unknown key 'max_train_stepz'"),
    # dataset configs
    Case("dataset config", "syntax", "syntax error", _dataset_config(lambda d: "[general\nbatch_size = 1\n"),
         DatasetError, r"is not valid TOML: .*line 1"),
    Case("dataset config", "unknown-key", "colour_aug in [[datasets]]",
         _one_subset(dataset="colour_aug = true"),
         DatasetError, "key 'colour_aug' is not supported; valid: "),
    Case("dataset config", "num-repeats-type", 'num_repeats = "ten"',
         _one_subset(subset='num_repeats = "ten"'),
         DatasetError, "num_repeats = 'ten' has the wrong type; expected an integer"),
    Case("dataset config", "bool-type", 'shuffle_caption = "yes"',
         _one_subset(general='shuffle_caption = "yes"'),
         DatasetError, "shuffle_caption = 'yes' has the wrong type; expected true or false"),
    Case("dataset config", "int-as-bool", "keep_tokens = true",
         _one_subset(dataset="keep_tokens = true"),
         DatasetError, "keep_tokens = True has the wrong type; expected an integer"),
    Case("dataset config", "extension-type", "caption_extension = 5",
         _one_subset(subset="caption_extension = 5"),
         DatasetError, "caption_extension = 5 has the wrong type; expected a quoted string"),
    Case("dataset config", "datasets-type", "datasets = 5", _dataset_config(lambda d: "datasets = 5\n"),
         DatasetError, r"datasets must be an array of tables"),
    Case("dataset config", "two-datasets", "two [[datasets]]",
         _dataset_config(lambda d: f'[[datasets]]\n[[datasets.subsets]]\nimage_dir = "{d}"\n[[datasets]]\n'),
         DatasetError, "found 2 \\[\\[datasets\\]\\]"),
    Case("dataset config", "no-image-dir", "subset without image_dir",
         _one_subset(subset="num_repeats = 2", image_dir=None),
         DatasetError, "has no image_dir"),
    Case("dataset config", "missing-dir", "image_dir that does not exist",
         _one_subset(image_dir="{d}-nope"),
         DatasetError, "nope' is not a folder"),
    Case("dataset config", "zero-repeats", "num_repeats = 0",
         _one_subset(subset="num_repeats = 0"),
         DatasetError, "num_repeats 0 must be >= 1"),
    Case("dataset config", "resolution", "resolution = 500",
         _one_subset(general="resolution = 500"),
         DatasetError, "500 is not a multiple of 8"),
    # dataset folders
    Case("dataset folder", "missing", "--train_data_dir that does not exist",
         _cli(lambda t: ["--train_data_dir", str(t / "nope")]), DatasetError, "does not exist"),
    Case("dataset folder", "file", "--train_data_dir is a file",
         _cli(lambda t: (t.joinpath("f").write_text("x"), ["--train_data_dir", str(t / "f")])[1]),
         DatasetError, "is not a folder"),
    Case("dataset folder", "no-subfolders", "no <repeats>_<class> subfolders",
         _cli(lambda t: (t.joinpath("d", "images").mkdir(parents=True), ["--train_data_dir", str(t / "d")])[1]),
         DatasetError, "has no <repeats>_<class tokens> subfolders"),
    Case("dataset folder", "no-images", "a subfolder without images",
         _cli(lambda t: (t.joinpath("d", "5_cat").mkdir(parents=True), ["--train_data_dir", str(t / "d")])[1]),
         DatasetError, "5_cat' has no images"),
    # images
    Case("image", "corrupt", "PNG header, garbage body", _collect(_write("bad.png", b"\x89PNG\r\n\x1a\nnope")),
         DatasetError, r"bad\.png' cannot be read"),
    Case("image", "empty", "zero-byte .jpg", _collect(_write("empty.jpg", b"")),
         DatasetError, r"empty\.jpg' cannot be read"),
    Case("image", "text", "a text file named .webp", _collect(_write("note.webp", b"hello")),
         DatasetError, r"note\.webp' cannot be read"),
    Case("image", "tiny", "a 1x1 image (resized up and cropped)", _collect(_image("tiny.png", "RGB", (1, 1))), None),
    Case("image", "modes", "greyscale, RGBA and palette images (converted to RGB)",
         _collect(lambda f: [_image(f"m{m}.png", m, (32, 32))(f) for m in ("L", "RGBA", "P")]), None),
    # captions
    Case("caption", "not-utf8", "a caption file that is not UTF-8",
         _collect(lambda f: (f / "0.txt").write_bytes(b"\xff\xfe\xfa bad")), DatasetError, "is not UTF-8 text"),
    Case("caption", "empty", "an empty caption file (class tokens used, as kohya)",
         _collect(lambda f: (f / "0.txt").write_text("")), None),
    Case("caption", "missing", "no caption file (class tokens used, as kohya)",
         _collect(lambda f: (f / "1.txt").unlink()), None),
    # network weights
    Case("network weights", "missing", "--network_weights that does not exist",
         _cli(lambda t: ["--network_weights", str(t / "none.safetensors")]), SaveError, "does not exist"),
    Case("network weights", "garbage", "--network_weights is not safetensors", _cli(_weights("garbage")),
         SaveError, "is not a readable .safetensors file"),
    Case("network weights", "other", "--network_weights of another model", _cli(_weights("other")),
         SaveError, "tensor\\(s\\) in the file are not in the network"),
    # resolutions
    *[Case("resolution", f"res-{v}", f"--resolution {v}", _cli(lambda t, v=v: ["--resolution", v]),
           ArgumentError, m)
      for v, m in (("100", "100 is not a multiple of 8"), ("512,500", "500 is not a multiple of 8"),
                   ("0", "positive"), ("abc", "expected \"SIZE\" or \"WIDTH,HEIGHT\""),
                   ("512,512,512", "expected \"SIZE\" or \"WIDTH,HEIGHT\", positive"), ("-64", "positive"))],
    # launch modes
    Case("launch", "fsdp", "accelerate launch --use_fsdp",
         _cli(lambda t: (__import__("os").environ.__setitem__("ACCELERATE_USE_FSDP", "true"), [])[1]),
         ArgumentError, "FSDP is not supported"),
    # optimizer inputs: dtypes and shapes
    Case("params", "bf16-only", "AdamWBF16_HinaAdaptive stepping float32 params",
         lambda t: _step(AdamWBF16_HinaAdaptive, [_p(4, 4)]), TypeError,
         r"steps bfloat16 parameters only, but group 0 param 0 \(shape \(4, 4\)\) is torch.float32"),
    Case("params", "bf16-mixed", "AdamWBF16_HinaAdaptive stepping bf16 + fp16 params",
         lambda t: _step(AdamWBF16_HinaAdaptive, [_p(4, dtype=torch.bfloat16), _p(4, dtype=torch.float16)]),
         TypeError, r"group 0 param 1 .* is torch.float16"),
    Case("params", "empty", "an empty parameter list", lambda t: HinaAdamW([]), ValueError,
         "empty parameter list"),
    Case("params", "single-tensor", "a tensor instead of a list", lambda t: HinaAdamW(_p(3)), TypeError,
         "not a single tensor"),
    Case("params", "int", "an integer tensor", lambda t: HinaAdamW([torch.zeros(3, dtype=torch.int64)]), TypeError,
         r"group 0 param 0 \(shape \(3,\)\) is torch.int64; only floating-point"),
    Case("params", "negative-lr", "lr=-1", lambda t: HinaAdamW([_p(3)], lr=-1), ValueError, "Invalid learning rate"),
    Case("params", "sparse", "sparse gradients", lambda t: (lambda e: (
        e(torch.tensor([1])).sum().backward(), HinaAdamW(e.parameters()).step()))(torch.nn.Embedding(4, 3, sparse=True)),
         RuntimeError, "does not support sparse gradients"),
    Case("params", "empty-group", "a param group with no params (next to a normal one)",
         lambda t: _step(HinaAdamW, [{"params": []}, {"params": [_p(4, 4)]}]), None),
    *[Case("params", f"zero-size-{c.__name__}", f"{c.__name__}: zero-size tensors (0, 4) and (4, 0)",
           lambda t, c=c: _step(c, [_p(0, 4), _p(4, 0), _p(4, 4)]), None)
      for c in (HinaAdamW, AdamW_HinaAdaptive, Automagic_CameAMP, Automagic_CameAMP8bit)],
    *[Case("params", f"one-element-{c.__name__}", f"{c.__name__}: one-element and 0-d tensors",
           lambda t, c=c: _step(c, [_p(1), torch.nn.Parameter(torch.tensor(0.5)), _p(1, 1)]), None)
      for c in (HinaAdamW, AdamW_HinaAdaptive, Automagic_CameAMP, Automagic_CameAMP8bit)],
    *[Case("params", f"conv-{c.__name__}", f"{c.__name__}: 4-D conv weights (LoRA conv pair)",
           lambda t, c=c: _step(c, [{"params": [_p(4, 8, 3, 3), _p(16, 4, 1, 1)],
                                     "named": ["lora_unet_conv.lora_down.weight", "lora_unet_conv.lora_up.weight"]}]),
           None)
      for c in (HinaAdamW, AdamW_HinaAdaptive, Automagic_CameAMP, Automagic_CameAMP8bit)],
    Case("params", "conv-bf16", "AdamWBF16_HinaAdaptive: 4-D conv weights and a zero-size tensor",
         lambda t: _step(AdamWBF16_HinaAdaptive, [_p(4, 8, 3, 3, dtype=torch.bfloat16), _p(0, 4, dtype=torch.bfloat16)]),
         None),
    *[Case("params", f"mixed-dtypes-{c.__name__}", f"{c.__name__}: fp16, bf16 and fp32 params in one group",
           lambda t, c=c: _step(c, [_p(8, 8, dtype=torch.float16), _p(8, 8, dtype=torch.bfloat16), _p(8, 8)]), None)
      for c in (HinaAdamW, AdamW_HinaAdaptive, Automagic_CameAMP, Automagic_CameAMP8bit)],
    # issue 13: kohya options and the trainer's bugs
    Case("scheduler", "typo", "--lr_scheduler cosin (a typo)", _cli(lambda t: ["--lr_scheduler", "cosin"]),
         ArgumentError, r"--lr_scheduler 'cosin' is not a scheduler \(did you mean cosine\?\); valid: linear"),
    Case("scheduler", "adafactor", "--lr_scheduler adafactor with another optimizer",
         _cli(lambda t: ["--lr_scheduler", "adafactor"]), ArgumentError, "works only with --optimizer_type Adafactor"),
    Case("scheduler", "no-step-rules", "--lr_scheduler piecewise_constant without step_rules",
         _cli(lambda t: ["--lr_scheduler", "piecewise_constant"]), ArgumentError, "needs --lr_scheduler_args step_rules"),
    Case("scheduler", "warmup-negative", "--lr_warmup_steps -0.5", _cli(lambda t: ["--lr_warmup_steps=-0.5"]),
         ArgumentError, "must be a step count >= 0 or a fraction below 1"),
    Case("logging", "tensorboard-no-dir", "--log_with tensorboard without --logging_dir",
         _cli(lambda t: ["--log_with", "tensorboard"]), ArgumentError, "needs --logging_dir"),
    Case("saving", "format", "--save_model_as diffusers", _cli(lambda t: ["--save_model_as", "diffusers"]),
         ArgumentError, "valid: safetensors, ckpt, pt"),
    Case("saving", "last-n-without-every", "--save_last_n_epochs without --save_every_n_epochs",
         _cli(lambda t: ["--save_last_n_epochs", "2"]), ArgumentError, "add --save_every_n_epochs N"),
    Case("saving", "disk-full", "the disk fills up during a save", _disk_full, SaveError,
         r"could not write .*demo\.safetensors.*needs about 3\.0 MiB.*earlier saves are kept"),
    Case("saving", "resume-finished", "--resume a state that already reached the planned steps",
         _resume_finished, SaveError, "has already trained 8 steps .* nothing left to train"),
    Case("precision", "full-bf16", "--full_bf16 without --mixed_precision bf16", _cli(lambda t: ["--full_bf16"]),
         ArgumentError, "--full_bf16 needs --mixed_precision bf16"),
    Case("precision", "bf16-optimizer", "AdamWBF16_HinaAdaptive without --full_bf16",
         _cli(lambda t: ["--optimizer_type", "AdamWBF16_HinaAdaptive", "--max_train_steps", "1"]), ArgumentError,
         "steps bfloat16 parameters: add --mixed_precision bf16 --full_bf16"),
    Case("precision", "fp8-no-autocast", "--fp8_base without mixed precision", _cli(lambda t: ["--fp8_base"]),
         ArgumentError, "need --mixed_precision fp16 or bf16"),
    Case("validation", "split", "--validation_split 1.5", _cli(lambda t: ["--validation_split", "1.5"]),
         ArgumentError, r"must be a share in \[0, 1\)"),
    Case("validation", "every-without-split", "--validate_every_n_steps without --validation_split",
         _cli(lambda t: ["--validate_every_n_steps", "5"]), ArgumentError, "need --validation_split"),
    Case("network", "foreign-exception", "a network module failing with a bare AssertionError (LyCORIS)",
         _foreign_network_module, ArgumentError,
         r"--network_module foreign_net failed to build the network .*AssertionError: duplicated lora name"),
    Case("kohya options", "refused", "--deepspeed (a kohya option not implemented here)",
         _cli(lambda t: ["--deepspeed"]), ArgumentError, "--deepspeed is a kohya sd-scripts option"),
    Case("kohya options", "adaptive-noise-alone", "--adaptive_noise_scale without --noise_offset",
         _cli(lambda t: ["--adaptive_noise_scale", "0.1"]), ArgumentError, "needs --noise_offset"),
    Case("kohya options", "v-pred-like-with-v", "--v_pred_like_loss with --v_parameterization",
         _cli(lambda t: ["--v_pred_like_loss", "0.1", "--v_parameterization"]), ArgumentError,
         "cannot be used with --v_parameterization"),
    Case("kohya options", "scale-v-pred-alone", "--scale_v_pred_loss_like_noise_pred without --v_parameterization",
         _cli(lambda t: ["--scale_v_pred_loss_like_noise_pred"]), ArgumentError, "needs --v_parameterization"),
    Case("kohya options", "vae-batch-size", "--vae_batch_size 0", _cli(lambda t: ["--vae_batch_size", "0"]),
         ArgumentError, "--vae_batch_size 0 must be a positive integer"),
    Case("kohya options", "base-weights-missing", "--base_weights naming a file that does not exist",
         _cli(lambda t: ["--base_weights", str(t / "nothere.safetensors")]), SaveError,
         r"--base_weights '.*nothere\.safetensors' does not exist"),
    Case("kohya options", "base-weights-multipliers", "more --base_weights_multiplier values than files",
         _cli(lambda t: ["--base_weights", "a.safetensors", "--base_weights_multiplier", "1", "0.5"]), ArgumentError,
         "has 2 values for 1 --base_weights file"),
    Case("kohya options", "initial-epoch", "--initial_epoch 0", _cli(lambda t: ["--initial_epoch", "0"]),
         ArgumentError, "must be an epoch number >= 1"),
    Case("kohya options", "initial-step-past-end", "--initial_step at or past the planned steps",
         _cli(lambda t: ["--initial_step", "10", "--max_train_steps", "10"]), ArgumentError,
         "start at step 10, but the run plans 10 steps"),
    Case("kohya options", "dynamo-backend", "--dynamo_backend that is not a backend",
         _cli(lambda t: ["--torch_compile", "--dynamo_backend", "fast"]), ArgumentError,
         "--dynamo_backend 'fast'; valid: eager, aot_eager, inductor"),
    Case("kohya options", "inert", "--xformers", _printed(lambda t: __import__(
        "library.hina_train.args", fromlist=["x"]).parse_args(["--xformers"])), None),
    Case("data", "caption-extension", "captions in .txt files with kohya's default --caption_extension .caption",
         _printed(_uncaptioned_txt), None),
    Case("data", "tiny-image", "an 8x8 image trained at 512x512", _printed(_tiny_image), None),
]
IDS = [f"{c.area.replace(' ', '_')}-{c.id}" for c in CASES]
assert len(set(IDS)) == len(IDS), "case ids must be unique"


def run_case(case: Case, tmp: Path) -> tuple[str, str]:
    """('error', message) or ('handled', description); raises AssertionError on a wrong outcome."""
    import os

    saved = dict(os.environ)
    try:
        if case.expect is None:
            return "handled", str(case.run(tmp))
        with pytest.raises(case.expect) as info:
            case.run(tmp)
        message = str(info.value)
        assert re.search(case.match, message), f"message {message!r} does not match {case.match!r}"
        assert "Traceback" not in message
        return "error", message
    finally:
        os.environ.clear()
        os.environ.update(saved)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_bad_input(case, tmp_path):
    run_case(case, tmp_path)


def test_doc_lists_every_case():
    doc = (ROOT / "docs" / "BAD_INPUT.md").read_text()
    missing = [i for i in IDS if f"`{i}`" not in doc]
    assert not missing, f"docs/BAD_INPUT.md is out of date (run benchmarks/bad_input_table.py): {missing}"
