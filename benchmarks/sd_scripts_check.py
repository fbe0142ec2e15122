#!/usr/bin/env python
"""Train with kohya sd-scripts' real ``train_network.py`` and the Hina optimizers, end to end (issue 12).

    SD_SCRIPTS_PATH=/path/to/sd-scripts python benchmarks/sd_scripts_check.py [--cases a,b] [--steps 4]
        [--venv /work/sdvenv] [--work DIR] [--markdown FILE]

What it does, in order:

1. builds its own venv when ``--venv`` has none: ``torch==2.14.1 torchvision==0.29.1`` (on this platform the
   only pair whose torchvision imports; CPU), then the checkout's ``requirements.txt`` (minus its ``-e .``
   line, torch held at 2.14.1), ``bitsandbytes>=0.50`` and ``lycoris-lora``;
2. copies the checkout (``SD_SCRIPTS_PATH``, never modified) to ``WORK/sd-scripts`` and copies our
   ``library/hina`` and ``networks/lokr.py`` into it, as the drop-in instructions tell a user to;
3. writes a tiny SD 1.x model (diffusers folder), a CLIP tokenizer for ``--tokenizer_cache_dir`` and a
   4-image dataset (nothing is downloaded);
4. runs each case as its own process for ``--steps`` steps at 64x64 on the CPU, and prints per run: the exit
   code, the loss at the first and last step (sd-scripts' own tensorboard log), the optimizer class, LoRA /
   LoKr pairs and where the names came from, and the effective lr per parameter role at the first step.

Model widths: sd-scripts converts a diffusers UNet into its own ``library/original_unet.py`` UNet, which
hard-codes SD 1.x's widths (``BLOCK_OUT_CHANNELS = (320, 640, 1280, 1280)``, 32 GroupNorm groups) and depth
(4 blocks, 2 layers each). Depth cannot be reduced without patching, and a real-width UNet (860M parameters)
is too slow for a few dozen CPU runs, so **this check patches the width constants in its own copy of the
checkout** (``PATCHED_UNET_CONSTANTS``: widths 32/32/64/64, 8 groups) and writes a model with SD 1.x's full
block layout at those widths. Everything else is the checkout's unmodified code.

Not part of ``make test`` (tens of minutes on 2 cores); ``tests/test_sd_scripts_check.py`` drives it when
``SD_SCRIPTS_PATH`` is set, and ``make sd-scripts-check`` runs every case.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TORCH_PAIR = ("torch==2.14.1", "torchvision==0.29.1")
EXTRA_PACKAGES = ("bitsandbytes>=0.50", "lycoris-lora")
# (text in library/original_unet.py, what the check's copy gets instead)
PATCHED_UNET_CONSTANTS = (
    ("BLOCK_OUT_CHANNELS: Tuple[int] = (320, 640, 1280, 1280)", "BLOCK_OUT_CHANNELS: Tuple[int] = (32, 32, 64, 64)"),
    ("NORM_GROUPS: int = 32", "NORM_GROUPS: int = 8"),
    ("TRANSFORMER_NORM_NUM_GROUPS = 32", "TRANSFORMER_NORM_NUM_GROUPS = 8"),
)
TINY_UNET = dict(  # SD 1.x's block layout (diffusers' defaults) at the patched widths
    sample_size=8, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(32, 32, 64, 64),
    norm_num_groups=8, cross_attention_dim=32, attention_head_dim=8,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"))
TOKENIZER_FOLDER = "openai_clip-vit-large-patch14"  # sd-scripts' TOKENIZER_ID, as --tokenizer_cache_dir names it
NUM_IMAGES = 4
HINA_NOTICE = "library.hina"


# ----------------------------------------------------------------------------------------------------------
# cases
def _lora(*extra):
    return ["--network_module", "networks.lora", "--network_dim", "4", "--network_alpha", "2", *extra]


def _lokr(*extra):
    return ["--network_module", "networks.lokr", "--network_dim", "4", "--network_alpha", "2",
            "--network_args", "factor=4", *extra]


def _lycoris(*extra):
    return ["--network_module", "lycoris.kohya", "--network_dim", "4", "--network_alpha", "2",
            "--network_args", "algo=lokr", "preset=attn-mlp", "factor=4", *extra]


def _hina(name, *args):
    return ["--optimizer_type", name, *(["--optimizer_args", *args] if args else [])]


# name -> (route, arguments). route: "stock" (train_network.py as is), "hook" (a launcher that calls
# library.hina.kohya.install() first, as docs/SD_SCRIPTS.md shows), "delegate" (train_network_hina.py
# --sd_scripts CHECKOUT), "delegate-config" (the same with --config_file holding optimizer and network).
CASES: dict[str, tuple[str, list[str]]] = {
    "stock-dotted-lora": ("stock", _lora() + _hina("library.hina.HinaAdamW", "use_spd=True")),
    "hook-lora": ("hook", _lora() + _hina("HinaAdamW", "use_spd=True")),
    "delegate-lora": ("delegate", _lora() + _hina("HinaAdamW")),
    "delegate-config-lora": ("delegate-config", []),
    "hook-lokr": ("hook", _lokr() + _hina("HinaAdamW")),
    "hook-lycoris-attn-mlp": ("hook", _lycoris() + _hina("HinaAdamW")),
    "stock-dotted-lycoris": ("stock", _lycoris() + _hina("library.hina.HinaAdamW")),
    "hook-AdamW_HinaAdaptive": ("hook", _lora() + _hina("AdamW_HinaAdaptive")),
    "hook-AdamWBF16_HinaAdaptive": ("hook", _lora("--full_bf16", "--mixed_precision", "bf16")
                                    + _hina("AdamWBF16_HinaAdaptive")),
    "hook-Automagic_CameAMP": ("hook", _lora() + _hina("Automagic_CameAMP", "lr_bump=1e-5")),
    "hook-Automagic_CameAMP8bit": ("hook", _lora() + _hina("Automagic_CameAMP8bit")),
    "hook-Automagic_CameAMP_COptim": ("hook", _lora() + _hina("Automagic_CameAMP_COptim")),
    "hook-Automagic_CameAMP_COptim8bit": ("hook", _lora() + _hina("Automagic_CameAMP_COptim8bit")),
    "hook-loraplus-lora": ("hook", _lora("--network_args", "loraplus_lr_ratio=16") + _hina("HinaAdamW")),
    "hook-loraplus-lokr": ("hook", ["--network_module", "networks.lokr", "--network_dim", "4", "--network_alpha",
                                    "2", "--network_args", "factor=4", "decompose_both=True",
                                    "loraplus_lr_ratio=16"] + _hina("HinaAdamW")),
    "stock-loraplus-lora": ("stock", _lora("--network_args", "loraplus_lr_ratio=16")
                            + _hina("library.hina.HinaAdamW")),
    "hook-AdEMAMix8bit": ("hook", _lora() + ["--optimizer_type", "AdEMAMix8bit"]),
    "hook-save-state": ("hook", _lora("--save_state") + _hina("HinaAdamW")),
    "hook-resume": ("hook", _lora() + _hina("HinaAdamW")),  # --resume added from hook-save-state's output
    # weight residency (params moved into the optimizer's buffers): accelerate's save_state must keep every param
    "hook-resident-save-state": ("hook", _lora("--save_state") + _hina("HinaAdamW", "resident_weights=True")),
    "hook-resident-resume": ("hook", _lora() + _hina("HinaAdamW", "resident_weights=True")),
}
# a resume case -> the case whose saved state it resumes
RESUMES = {"hook-resume": "hook-save-state", "hook-resident-resume": "hook-resident-save-state"}
CONFIG_RECIPE = """# what --config_file carries in the delegate-config case
optimizer_type = "HinaAdamW"
optimizer_args = ["use_spd=True", "spd_lambda=0.06"]
network_module = "networks.lora"
network_dim = 4
network_alpha = 2
"""


# ----------------------------------------------------------------------------------------------------------
# set-up (runs in the driver's Python)
def ensure_venv(venv: Path, checkout: Path) -> Path:
    """``venv``'s python, creating the venv and installing sd-scripts' requirements when it is missing."""
    python = venv / "bin" / "python"
    stamp = venv / ".hina-sd-scripts-check"
    if python.exists() and stamp.exists():
        return python
    print(f"building {venv} (torch {TORCH_PAIR[0].split('==')[1]} + the checkout's requirements) ...", flush=True)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(python), "-m", "pip", "install", "--quiet"]
    subprocess.run([*pip, *TORCH_PAIR], check=True)
    requirements = [line for line in (checkout / "requirements.txt").read_text().splitlines()
                    if not line.strip().startswith("-e")]
    (venv / "requirements-sd-scripts.txt").write_text("\n".join(requirements) + "\n")
    (venv / "constraints.txt").write_text(TORCH_PAIR[0] + "\n")
    subprocess.run([*pip, "-r", str(venv / "requirements-sd-scripts.txt"), "-c", str(venv / "constraints.txt"),
                    *EXTRA_PACKAGES], check=True)
    stamp.write_text("ok\n")
    return python


def prepare_checkout(source: Path, target: Path) -> Path:
    """A copy of the checkout with our files dropped in and the UNet width constants patched."""
    if not (source / "train_network.py").is_file() or not (source / "library" / "original_unet.py").is_file():
        raise SystemExit(f"SD_SCRIPTS_PATH={source} is not an sd-scripts checkout "
                         "(expected train_network.py and library/original_unet.py)")
    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(source, target, ignore=shutil.ignore_patterns(".git", "__pycache__"))
    unet = target / "library" / "original_unet.py"
    text = unet.read_text(encoding="utf-8")
    for old, new in PATCHED_UNET_CONSTANTS:
        if text.count(old) != 1:
            raise SystemExit(f"{source}/library/original_unet.py: expected one line {old!r} to patch for the tiny "
                             "model; this checkout differs from the one the check was written for")
        text = text.replace(old, new)
    unet.write_text(text, encoding="utf-8")
    shutil.copytree(REPO / "library" / "hina", target / "library" / "hina",
                    ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy2(REPO / "networks" / "lokr.py", target / "networks" / "lokr.py")
    return target


def git_head(checkout: Path) -> str:
    """The checkout's commit (``SD_SCRIPTS_COMMIT`` names it for an exported tree without ``.git``)."""
    try:
        out = subprocess.run(["git", "-C", str(checkout), "rev-parse", "--short=8", "HEAD"], capture_output=True,
                             text=True, timeout=30)
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip()
    except OSError:
        pass
    return os.environ.get("SD_SCRIPTS_COMMIT", "unknown commit")


# ----------------------------------------------------------------------------------------------------------
# model and data (runs in the check's venv: the model must load with sd-scripts' pinned diffusers)
def write_model_and_data(work: Path) -> None:
    sys.path.insert(0, str(REPO))
    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from library.hina_train import demo_data, tiny_model

    words = demo_data.caption_words()
    tokenizer_dir = tiny_model.write_tokenizer(work / "tokenizers" / TOKENIZER_FOLDER, words)
    tokenizer = tiny_model.load_tokenizer(words)
    torch.manual_seed(0)
    text_encoder = CLIPTextModel(CLIPTextConfig(**tiny_model.text_encoder_config(len(tokenizer))))
    vae = AutoencoderKL(**tiny_model.vae_config())
    unet = UNet2DConditionModel(**TINY_UNET)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=DDPMScheduler(clip_sample=False), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    staging = work / ".model-staging"
    shutil.rmtree(staging, ignore_errors=True)
    pipe.save_pretrained(staging, safe_serialization=True)
    shutil.rmtree(work / "model", ignore_errors=True)
    os.replace(staging, work / "model")
    demo_data.make_demo_dataset(work / "data", seed=0, num_images=NUM_IMAGES)
    print(f"model: {work / 'model'}, tokenizer: {tokenizer_dir}, data: {work / 'data'}")


# ----------------------------------------------------------------------------------------------------------
# one run (runs in the check's venv, cwd = the checkout copy)
def describe_optimizer(optimizer) -> dict:
    """Class, pairs, where names came from and the effective lr per role, at the first step."""
    from library.hina import naming

    groups = optimizer.param_groups
    report = {"optimizer": f"{type(optimizer).__module__}.{type(optimizer).__name__}",
              "groups": len(groups), "group_lrs": [g["lr"] for g in groups]}
    inputs = [naming.GroupParams(g.get("param_names"), [tuple(p.shape) for p in g["params"]], "param_names",
                                 g["lr"]) for g in groups]
    model = naming.pair_groups(inputs)
    report["pair_groups"] = model.counts()
    report["name_sources"] = sorted({p.name_source for p in model.groups})
    if hasattr(optimizer, "get_optimization_info"):
        info = optimizer.get_optimization_info()
        report["optimizer_info"] = {"lora_pairs": info["lora_stats"]["lora_pairs"],
                                    "lokr_pairs": info["lokr_stats"]["lokr_pairs"]}
        report["name_sources"] = sorted({g["name_source"] for g in optimizer.diagnose_lora_pairing()["groups"]})
        report["global_step_at_first_step"] = max(g.get("global_step", 0) for g in groups)
    effective: dict[str, set] = {}
    if not hasattr(optimizer, "get_optimization_info"):  # not a Hina optimizer: no roles, the groups' lrs
        report["effective_lr"] = {"all": sorted({float(f"{g['lr']:.6g}") for g in groups})}
        report["state_tensors_at_first_step"] = sum(len(s) for s in optimizer.state.values())
        return report
    for index, (group, pairing) in enumerate(zip(groups, _optimizer_pairings(optimizer, inputs))):
        roles = pairing.roles()
        multipliers = optimizer.lr_multipliers(group, roles) if hasattr(optimizer, "lr_multipliers") else None
        for i, role in enumerate(roles):
            effective.setdefault(role, set()).add(float(f"{group['lr'] * (multipliers[i] if multipliers else 1.0):.6g}"))
    report["effective_lr"] = {role: sorted(values) for role, values in sorted(effective.items())}
    report["state_tensors_at_first_step"] = sum(len(s) for s in optimizer.state.values())
    return report


def _optimizer_pairings(optimizer, inputs) -> list:
    """The roles the optimizer itself uses (its private pairing, whichever name this version gives it);
    for other optimizers, each group classified on its own, as an optimizer that reads names would."""
    from library.hina import naming

    if callable(getattr(optimizer, "_pairings", None)):
        return optimizer._pairings()
    if callable(getattr(optimizer, "_pairing", None)):
        return [optimizer._pairing(g) for g in optimizer.param_groups]
    return [naming.pair_parameters(g.names, g.shapes, g.name_source) for g in inputs]


def read_losses(logdir: Path) -> list[float]:
    """sd-scripts' per-step ``loss/current`` from its tensorboard log, in step order."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    points = []
    for folder, _, files in os.walk(logdir):
        if any(f.startswith("events.out.tfevents") for f in files):
            accumulator = EventAccumulator(folder)
            accumulator.Reload()
            if "loss/current" in accumulator.Tags().get("scalars", []):
                points += [(e.step, e.value) for e in accumulator.Scalars("loss/current")]
    return [value for _, value in sorted(points)]


def launch(report_path: Path, logdir: Path, entry: str, hook: bool, argv: list[str]) -> None:
    """Run ``entry`` as ``__main__`` with ``argv``, recording the optimizer at its first step."""
    import runpy

    from torch.optim.optimizer import register_optimizer_step_pre_hook

    report: dict = {"steps": 0}

    def write() -> None:
        report_path.write_text(json.dumps(report, indent=1, default=str))

    def on_step(optimizer, args, kwargs):
        report["steps"] += 1
        if report["steps"] == 1:
            try:
                report.update(describe_optimizer(optimizer))
            except Exception as error:  # the report must not change what the run does
                report["describe_error"] = f"{type(error).__name__}: {error}"
            write()

    register_optimizer_step_pre_hook(on_step)
    sys.argv = [entry, *argv]
    sys.path.insert(0, str(Path(entry).resolve().parent))
    if hook:
        sys.path.insert(0, os.getcwd())
        import library.hina.kohya

        library.hina.kohya.install()
    try:
        runpy.run_path(entry, run_name="__main__")
    finally:
        report["losses"] = read_losses(logdir)
        write()


# ----------------------------------------------------------------------------------------------------------
# the driver
def common_args(work: Path, name: str, steps: int) -> list[str]:
    return ["--pretrained_model_name_or_path", str(work / "model"), "--train_data_dir", str(work / "data"),
            "--tokenizer_cache_dir", str(work / "tokenizers"), "--resolution", "64", "--train_batch_size", "1",
            "--max_train_steps", str(steps), "--learning_rate", "1e-3", "--lr_scheduler", "constant",
            "--seed", "0", "--output_dir", str(work / "out" / name), "--output_name", name,
            "--save_model_as", "safetensors", "--caption_extension", ".txt", "--max_data_loader_n_workers", "0",
            "--log_with", "tensorboard", "--logging_dir", str(work / "tb" / name)]


def run_case(name: str, python: Path, checkout: Path, work: Path, steps: int, timeout: int) -> dict:
    route, case_args = CASES[name]
    # the resumed run starts at the saved step (sd-scripts restores it), so it runs to twice the steps
    argv = common_args(work, name, steps * 2 if name in RESUMES else steps) + case_args
    if route in ("delegate", "delegate-config"):
        entry, hook = str(REPO / "train_network_hina.py"), False
        argv = ["--sd_scripts", str(checkout), *argv]
        if route == "delegate-config":
            config = work / "recipe.toml"
            config.write_text(CONFIG_RECIPE)
            argv += ["--config_file", str(config)]
    else:
        entry, hook = str(checkout / "train_network.py"), route == "hook"
    if name in RESUMES:
        saved = RESUMES[name]
        argv += ["--resume", str(work / "out" / saved / f"{saved}-state")]
    for folder in (work / "out" / name, work / "tb" / name):
        shutil.rmtree(folder, ignore_errors=True)
    report_path = work / "reports" / f"{name}.json"
    report_path.parent.mkdir(parents=True, exist_ok=True)
    report_path.unlink(missing_ok=True)
    log = work / "logs" / f"{name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    command = [str(python), str(Path(__file__).resolve()), "--launch", str(report_path), str(work / "tb" / name),
               entry, "hook" if hook else "plain", "--", *argv]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "PYTHONUNBUFFERED": "1"}
    env.pop("PYTHONPATH", None)
    started = time.time()
    with open(log, "w") as out:
        try:
            code = subprocess.run(command, cwd=checkout, env=env, stdout=out, stderr=subprocess.STDOUT,
                                  timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            code = "timeout"
    result = {"case": name, "route": route, "exit": code, "seconds": round(time.time() - started, 1),
              "log": str(log)}
    if report_path.exists():
        result.update(json.loads(report_path.read_text()))
    text = log.read_text(errors="replace")
    result["notices"] = sorted({line.strip() for line in text.splitlines()
                                if line.startswith(HINA_NOTICE + ":") or "no parameter names reached" in line})
    saved = work / "out" / name / f"{name}.safetensors"
    result["saved"] = saved.exists()
    if code != 0:
        result["error"] = _last_error(text)
    return result


def _last_error(text: str) -> str:
    lines = [line for line in text.splitlines() if re.match(r"^\w*(Error|Exception)\b|^\w+\.\w+Error", line)
             or "Error:" in line or line.startswith("error:")]
    return (lines[-1] if lines else text.strip().splitlines()[-1] if text.strip() else "")[:300]


def write_text_atomically(path: Path, text: str) -> None:
    sys.path.insert(0, str(REPO))
    from library.hina_train.saving import atomic_write

    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def format_row(r: dict) -> str:
    losses = r.get("losses") or []
    loss = f"{losses[0]:.4f} -> {losses[-1]:.4f}" if losses else "-"
    pairs = r.get("pair_groups", {})
    info = r.get("optimizer_info")
    if info is None:  # not a Hina optimizer: it gets no names and has no roles
        pair_text, names = "n/a (not a Hina optimizer)", "-"
    else:
        pair_text = (f"LoRA {pairs.get('lora_pairs', 0)} / LoKr {pairs.get('lokr_pairs', 0)} (optimizer's own "
                     f"count: LoRA {info['lora_pairs']} / LoKr {info['lokr_pairs']})")
        names = ", ".join(r.get("name_sources", [])) or "-"
    lrs = ", ".join(f"{role} {'/'.join(f'{v:g}' for v in values)}" for role, values in r.get("effective_lr", {}).items())
    optimizer = (r.get("optimizer") or "-").rsplit(".", 1)[-1]
    return f"| {r['case']} | {r['exit']} | {loss} | {optimizer} | {pair_text} | {names} | {lrs or '-'} |"


TABLE_HEADER = ("| case | exit | loss first -> last | optimizer | pairs (across groups, by name) | names from | "
                "effective lr per role (first step) |\n|---|---|---|---|---|---|---|")


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--prepare":
        write_model_and_data(Path(argv[1]))
        return 0
    if argv and argv[0] == "--launch":
        report, logdir, entry, hook, separator, *rest = argv[1:]
        assert separator == "--", argv
        launch(Path(report), Path(logdir), entry, hook == "hook", rest)
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", default="all", help=f"comma-separated, or 'all': {', '.join(CASES)}")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--venv", type=Path, default=Path(os.environ.get("SD_SCRIPTS_VENV", "/work/sdvenv")))
    parser.add_argument("--work", type=Path, default=Path(os.environ.get("SD_SCRIPTS_WORK", "/tmp/hina-sd-check")))
    parser.add_argument("--timeout", type=int, default=900, help="seconds per run")
    parser.add_argument("--json", type=Path, help="write every run's report here")
    parser.add_argument("--markdown", type=Path, help="write the table here")
    args = parser.parse_args(argv)
    if not os.environ.get("SD_SCRIPTS_PATH"):
        parser.error("set SD_SCRIPTS_PATH to an sd-scripts checkout")
    names = list(CASES) if args.cases == "all" else [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = [n for n in names if n not in CASES]
    if unknown:
        parser.error(f"unknown case(s) {', '.join(unknown)}; valid: {', '.join(CASES)}")
    for resume, saved in RESUMES.items():
        if resume in names and saved not in names:
            names.insert(names.index(resume), saved)
    source = Path(os.environ["SD_SCRIPTS_PATH"]).expanduser().resolve()
    python = ensure_venv(args.venv, source)
    args.work.mkdir(parents=True, exist_ok=True)
    checkout = prepare_checkout(source, args.work / "sd-scripts")
    subprocess.run([str(python), str(Path(__file__).resolve()), "--prepare", str(args.work)], check=True,
                   env={**os.environ, "OMP_NUM_THREADS": "1"})
    print(f"sd-scripts {git_head(source)} from {source}; {args.steps} steps per run\n\n{TABLE_HEADER}", flush=True)
    results = []
    for name in names:
        result = run_case(name, python, checkout, args.work, args.steps, args.timeout)
        results.append(result)
        print(format_row(result), flush=True)
        for notice in result["notices"]:
            print(f"    notice: {notice}", flush=True)
        if result["exit"] != 0:
            print(f"    error: {result.get('error', '')}  (log: {result['log']})", flush=True)
    if args.json:
        text = json.dumps({"sd_scripts": git_head(source), "steps": args.steps, "runs": results}, indent=1, default=str)
        write_text_atomically(args.json, text + "\n")
    if args.markdown:
        write_text_atomically(args.markdown, TABLE_HEADER + "\n" + "\n".join(format_row(r) for r in results) + "\n")
    failed = [r["case"] for r in results if r["exit"] != 0]
    print(f"\n{len(results) - len(failed)} passed, {len(failed)} failed" + (f": {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
