"""Sample images during training, as kohya sd-scripts makes them (``train_util.sample_images_common``,
``line_to_prompt_dict``, ``get_my_scheduler``, ``sample_image_inference``).

- ``--sample_prompts FILE``: ``.txt`` (one prompt per line, ``#`` comments; options after the prompt:
  ``--n`` negative prompt, ``--w``/``--h`` size (default 512, rounded down to a multiple of 8, at least 64),
  ``--s`` steps (default 30, 1..1000), ``--l`` CFG scale (default 7.5), ``--d`` seed, ``--ss`` sampler),
  ``.toml`` (``[prompt]`` defaults + ``[[prompt.subset]]`` entries with keys prompt, negative_prompt, width,
  height, sample_steps, scale, seed, sample_sampler) or ``.json`` (a list of such dicts or prompt lines).
  The file is checked before training and read again at each sampling, so prompts can be edited meanwhile.
- When: ``--sample_at_first`` (before the first step), every ``--sample_every_n_steps`` steps, or every
  ``--sample_every_n_epochs`` epochs (which then replaces the step rule) — kohya's rule, ``due``.
- ``--sample_sampler`` (and ``--ss``): kohya's names mapped to diffusers schedulers (``SAMPLERS``), kohya's
  training schedule (scaled-linear betas 0.00085..0.012, 1000 steps), ``clip_sample`` on where it exists,
  v-prediction with ``--v_parameterization``.
- Files: ``<output_dir>/sample/<output_name>_<NNNNNN or eNNNNNN>_<prompt index:02d>_<YYYYmmddHHMMSS>[_<seed>].png``
  (kohya's names; the number is the step, or ``e`` + the epoch when sampled at an epoch's end; the prompt
  index keeps the file order), written atomically; with TensorBoard logging also as images ``sample_<index>``.

Generation is classifier-free guidance with the training's own text conditioning (clip skip, long prompts,
SDXL size ids) and the network applied; the network is put in eval mode meanwhile (no dropout) and a
private generator is used, so training's random draws are untouched.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import torch

from .errors import ArgumentError

# kohya's sampler names -> (diffusers scheduler class, extra config)
SAMPLERS = {
    "ddim": ("DDIMScheduler", {}), "pndm": ("PNDMScheduler", {}),
    "lms": ("LMSDiscreteScheduler", {}), "k_lms": ("LMSDiscreteScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}), "k_euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}), "k_euler_a": ("EulerAncestralDiscreteScheduler", {}),
    # diffusers >= 0.30 refuses the first-order "dpmsolver" with its default final sigma of zero
    "dpmsolver": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver", "final_sigmas_type": "sigma_min"}),
    "dpmsolver++": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++"}),
    "dpmsingle": ("DPMSolverSinglestepScheduler", {}), "heun": ("HeunDiscreteScheduler", {}),
    "dpm_2": ("KDPM2DiscreteScheduler", {}), "k_dpm_2": ("KDPM2DiscreteScheduler", {}),
    "dpm_2_a": ("KDPM2AncestralDiscreteScheduler", {}), "k_dpm_2_a": ("KDPM2AncestralDiscreteScheduler", {}),
}
DEFAULTS = {"width": 512, "height": 512, "sample_steps": 30, "scale": 7.5}
# prompt-line options: flag -> (key, converter)
LINE_OPTIONS = {"w": ("width", int), "h": ("height", int), "d": ("seed", int), "s": ("sample_steps", int),
                "l": ("scale", float), "n": ("negative_prompt", str), "ss": ("sample_sampler", str)}


def make_scheduler(name: str, v_parameterization: bool):
    import diffusers

    if name not in SAMPLERS:
        raise ArgumentError(f"sampler {name!r} is not known; valid: {', '.join(SAMPLERS)}")
    cls_name, extra = SAMPLERS[name]
    config = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", **extra)
    if v_parameterization:
        config["prediction_type"] = "v_prediction"
    scheduler = getattr(diffusers, cls_name)(**config)
    if getattr(scheduler.config, "clip_sample", None) is False:
        scheduler.register_to_config(clip_sample=True)  # kohya samples with clip_sample on
    return scheduler


def parse_line(line: str, where: str = "") -> dict:
    """kohya's ``line_to_prompt_dict``: "prompt --w 512 --n bad --d 1" -> dict; a bad option value is an error."""
    parts = line.split(" --")
    prompt = {"prompt": parts[0].strip()}
    for part in parts[1:]:
        match = re.match(r"(ss|[whdslng])\s+(.+)", part.strip(), re.IGNORECASE | re.DOTALL)
        if not match:
            continue  # kohya ignores options it does not know (--g, --cn ... belong to other models)
        flag, value = match.group(1).lower(), match.group(2).strip()
        if flag not in LINE_OPTIONS:
            continue
        key, convert = LINE_OPTIONS[flag]
        try:
            prompt[key] = convert(value)
        except ValueError:
            raise ArgumentError(f"{where}prompt option --{flag} {value!r} is not a valid {convert.__name__}") from None
    return prompt


def _check(prompt: dict, where: str) -> dict:
    if not isinstance(prompt, dict) or not isinstance(prompt.get("prompt", ""), str):
        raise ArgumentError(f"{where}expected a prompt line or a table with a 'prompt' string, got {prompt!r}")
    for key in ("width", "height", "sample_steps", "seed"):
        value = prompt.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
            raise ArgumentError(f"{where}{key} {value!r} must be a non-negative integer")
    scale = prompt.get("scale")
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float))):
        raise ArgumentError(f"{where}scale {scale!r} must be a number")
    sampler = prompt.get("sample_sampler")
    if sampler is not None and sampler not in SAMPLERS:
        raise ArgumentError(f"{where}sampler {sampler!r} is not known; valid: {', '.join(SAMPLERS)}")
    return prompt


def load_prompts(path: str | Path) -> list[dict]:
    """The prompts of a kohya prompt file, each with its ``enum`` (position); raises ArgumentError."""
    path = Path(path)
    where = f"--sample_prompts {str(path)!r}: "
    if not path.is_file():
        raise ArgumentError(f"--sample_prompts {str(path)!r} does not exist")
    suffix = path.suffix.lower()
    try:
        text = path.read_text(encoding="utf-8")
        if suffix == ".toml":
            import toml

            data = toml.loads(text)
            base = data.get("prompt", {})
            raw = [{**{k: v for k, v in base.items() if k != "subset"}, **sub} for sub in base.get("subset", [])]
        elif suffix == ".json":
            raw = json.loads(text)
            if not isinstance(raw, list):
                raise ArgumentError(f"{where}a JSON prompt file holds a list of prompts")
        else:
            raw = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    except ArgumentError:
        raise
    except Exception as e:  # UnicodeDecodeError, toml/json decode errors
        raise ArgumentError(f"{where}cannot be read: {type(e).__name__}: {e}") from None
    if not raw:
        raise ArgumentError(f"{where}has no prompts")
    prompts = []
    for i, entry in enumerate(raw):
        prompt = parse_line(entry, where) if isinstance(entry, str) else entry
        prompt = _check(dict(prompt) if isinstance(prompt, dict) else prompt, f"{where}prompt {i + 1}: ")
        prompt["enum"] = i
        prompts.append(prompt)
    return prompts


def due(args, steps: int, epoch: int | None) -> bool:
    """kohya's rule: sample now? ``epoch`` is None after a step, the epoch number at an epoch's end, 0 at first."""
    if not args.sample_prompts:
        return False
    if steps == 0:
        return bool(args.sample_at_first)
    if args.sample_every_n_steps is None and args.sample_every_n_epochs is None:
        return False
    if args.sample_every_n_epochs is not None:
        return epoch is not None and epoch % args.sample_every_n_epochs == 0
    return epoch is None and steps % args.sample_every_n_steps == 0


def file_name(output_name: str | None, steps: int, epoch: int | None, index: int, seed: int | None,
              timestamp: str) -> str:
    """kohya's sample file name."""
    number = f"e{epoch:06d}" if epoch is not None else f"{steps:06d}"
    return f"{'' if output_name is None else output_name + '_'}{number}_{index:02d}_{timestamp}" \
           f"{'' if seed is None else f'_{seed}'}.png"


@torch.no_grad()
def generate(models, conditioner, prompt: dict, sampler: str, v_parameterization: bool, device,
             autocast, input_dtype: torch.dtype | None = None) -> "PIL.Image.Image":
    """One image for ``prompt`` (a ``load_prompts`` entry). ``input_dtype``: the U-Net's input dtype when it
    differs from its weights' (float8 base weights compute in the mixed-precision dtype)."""
    from PIL import Image

    width = max(64, prompt.get("width", DEFAULTS["width"]) // 8 * 8)
    height = max(64, prompt.get("height", DEFAULTS["height"]) // 8 * 8)
    steps = max(1, min(1000, prompt.get("sample_steps", DEFAULTS["sample_steps"])))
    scale = float(prompt.get("scale", DEFAULTS["scale"]))
    seed = prompt.get("seed")
    generator = torch.Generator()
    if seed is not None:
        generator.manual_seed(seed)
    else:
        generator.seed()
    scheduler = make_scheduler(prompt.get("sample_sampler", sampler), v_parameterization)
    scheduler.set_timesteps(steps, device=device)
    unet, vae = models.unet, models.vae
    dtype = input_dtype or unet.dtype
    shape = (1, unet.config.in_channels, height // 8, width // 8)
    latents = (torch.randn(shape, generator=generator) * scheduler.init_noise_sigma).to(device)
    saved_resolution = conditioner.resolution
    conditioner.resolution = (width, height)
    try:
        with autocast():
            cond, added = conditioner([prompt.get("prompt", ""), prompt.get("negative_prompt") or ""], device)
            hidden = torch.cat([cond[1:], cond[:1]]).to(dtype)  # (negative, positive)
            kwargs = {}
            if added is not None:
                kwargs["added_cond_kwargs"] = {"text_embeds": torch.cat([added["text_embeds"][1:], added["text_embeds"][:1]]),
                                               "time_ids": added["time_ids"]}
            for t in scheduler.timesteps:
                model_input = scheduler.scale_model_input(torch.cat([latents] * 2), t)
                pred = unet(model_input.to(dtype), t, hidden, **kwargs).sample.float()
                uncond, text = pred.chunk(2)
                pred = uncond + scale * (text - uncond)
                latents = scheduler.step(pred, t, latents, generator=generator).prev_sample
        pixels = vae.decode(latents.float() / vae.config.scaling_factor).sample
    finally:
        conditioner.resolution = saved_resolution
    array = ((pixels[0].float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(array)


def sample_images(trainer, steps: int, epoch: int | None) -> list[Path]:
    """Make the samples that are ``due`` now (main process); returns their paths."""
    args = trainer.plan.args
    if not due(args, steps, epoch) or not trainer.accelerator.is_main_process:
        return []
    try:
        prompts = load_prompts(args.sample_prompts)
    except ArgumentError as e:  # edited into something unreadable during training: say so, keep training
        print(f"warning: no sample images at step {steps}: {e}")
        return []
    from .saving import atomic_write

    folder = trainer.plan.output_dir / "sample"
    network = trainer.accelerator.unwrap_model(trainer.network)
    was_training = network.training
    network.eval()
    paths = []
    tracker = None
    if getattr(trainer, "log_with", None):
        trackers = {t.name: t for t in trainer.accelerator.trackers}
        tracker = trackers.get("tensorboard")
    try:
        for prompt in prompts:
            image = generate(trainer.plan.models, trainer.conditioner, prompt, args.sample_sampler,
                             args.v_parameterization, trainer.device, trainer.accelerator.autocast,
                             getattr(trainer, "unet_dtype", None))
            name = file_name(args.output_name, steps, epoch, prompt["enum"], prompt.get("seed"),
                             time.strftime("%Y%m%d%H%M%S", time.localtime()))
            path = folder / name
            atomic_write(path, lambda tmp: image.save(tmp, format="PNG"))
            paths.append(path)
            if tracker is not None:
                import numpy as np

                tracker.writer.add_image(f"sample_{prompt['enum']}", np.asarray(image), steps, dataformats="HWC")
    finally:
        if was_training:
            network.train()
    from tqdm.auto import tqdm

    tqdm.write(f"sample images at step {steps}: {', '.join(str(p) for p in paths)}")  # keeps the bar intact
    return paths
