"""Convergence benchmark: held-out loss of adapter fine-tuning with each optimizer, and a HinaAdamW ablation.

Tasks (``benchmarks/tasks.py``): ``sd_lora`` (kohya LoRA on a tiny SD UNet), ``sd_lokr`` (kohya LoKr, same
task), ``llm_lora`` (peft LoRA on a tiny GPT-2). Each base model is pretrained once on one domain and cached;
the adapter is fine-tuned on another, and the held-out loss on that new domain is measured with fixed noise
and timesteps (or fixed token windows).

Protocol (the same for every optimizer):

1. learning-rate sweep: every optimizer gets the same grid (x1/10, x1/3, x1, x3, x10 around its typical lr:
   1e-3 for the Adam family, CAME and the Hina optimizers, 1.0 for Prodigy), ``--sweep-seeds`` seeds per value
   (``--quick``: x1 only); the best
   value is the lowest mean final eval loss (a run that produced a non-finite loss counts as worst);
2. at the best lr, ``--seeds`` seeds in all (the sweep's seeds are reused);
3. ablation (tasks ``sd_lora`` and ``llm_lora``): HinaAdamW at its task recipe and its best lr, with each
   technique flipped in turn (switched off if the recipe has it on: "no X"; on if it is off: "+ X"), fp32
   instead of 8-bit states, and all off; same seeds.

Every run: gradient clipping at 1.0 (kohya's default ``max_grad_norm``), constant lr, the same batches,
noise and adapter initialisation per seed for every optimizer. Hina optimizers get named parameter groups
(``param_names``) as the kohya hook gives them, and are built through ``library.hina.create_optimizer``;
HinaAdamW takes its task's recipe (``configs/sd_lora.toml``, ``lokr.toml``, ``llm_lora.toml``) with the lr
replaced by the sweep value. AdamWBF16_HinaAdaptive (bf16 parameters only) trains a bf16 copy of the
adapter: before each forward the fp32 adapter is set to the bf16 values, after backward its gradient is
handed to the bf16 copy, so the trained weights are exactly the bf16 ones.

    python benchmarks/convergence.py                 # full suite -> docs/convergence.json
    python benchmarks/convergence.py --quick         # smoke run (< 5 min) -> docs/convergence_quick.json
    python benchmarks/report.py                      # docs/BENCHMARKS.md and the plots, from the JSON
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
QUICK_ABLATION = ("full (recipe)", "no cautious", "all off")
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


def ablation_variants(recipe_kwargs: dict) -> dict[str, dict]:
    """variant name -> overrides of HinaAdamW's recipe kwargs: every technique flipped in turn, relative to what
    the recipe (over the constructor defaults) has, then fp32 states and everything off."""
    import inspect

    from library.hina import HinaAdamW
    defaults = {k: v.default for k, v in inspect.signature(HinaAdamW.__init__).parameters.items()}
    variants = {"full (recipe)": {}}
    for name, flag in TECHNIQUES.items():
        on = bool(recipe_kwargs.get(flag, defaults[flag]))
        variants[("no " if on else "+ ") + name] = {flag: not on}
    variants["fp32 states"] = {"optim_bits": 32}
    variants["all off"] = {flag: False for flag in TECHNIQUES.values()}
    return variants


def hina_kwargs(name: str, recipe: str) -> dict:
    """The recipe's optimizer_args for HinaAdamW (the recipes are written for it); {} for the others."""
    if name != "HinaAdamW":
        return {}
    from library.hina import presets
    return presets.optimizer_kwargs(presets.load_recipe(recipe))


def build_optimizer(name: str, named: list, lr: float, recipe: str, overrides: dict | None = None):
    """(optimizer, shadow): ``shadow`` is the bf16 copy the bf16-only optimizer trains, else None."""
    params = [p for _, p in named]
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
    sync = torch.cuda.synchronize if job["device"].startswith("cuda") else (lambda: None)
    eval_steps, evals, train_losses, step_ms, opt_ms = [0], [run.eval_loss()], [], [], []
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
        optimizer.step()
        sync()
        t2 = time.perf_counter()
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
            evals.append(run.eval_loss())
    n_params = sum(p.numel() for p in params)
    final = evals[-1] if not diverged and math.isfinite(evals[-1]) else float("inf")
    return {**{k: job[k] for k in ("task", "optimizer", "lr", "seed", "variant")},
            "final_eval": final, "diverged": diverged, "eval_steps": eval_steps, "eval_loss": evals,
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


def run_jobs(jobs: list[dict], workers: int, label: str) -> list[dict]:
    t0 = time.time()
    results = []
    if workers <= 1:
        iterator = map(run_one, jobs)
        pool = None
    else:
        pool = mp.get_context("spawn").Pool(workers)
        iterator = pool.imap_unordered(run_one, jobs)
    try:
        for i, result in enumerate(iterator, 1):
            results.append(result)
            print(f"[{label} {i}/{len(jobs)} {time.time() - t0:6.0f}s] {result['task']:9s} {result['optimizer']:29s} "
                  f"{result['variant'] or '':18s} lr={result['lr']:<8g} seed={result['seed']} "
                  f"final={result['final_eval']:.5f} step={result['step_ms']:.1f}ms", flush=True)
    finally:
        if pool is not None:
            pool.close()
            pool.join()
    return results


def mean_final(results: list[dict]) -> float:
    values = [r["final_eval"] for r in results]
    return float("inf") if any(not math.isfinite(v) for v in values) else statistics.fmean(values)


def summarize(runs: list[dict]) -> dict:
    """Seeds of one configuration -> mean/std of the final loss, the mean curve with std band, timings."""
    finals = [r["final_eval"] for r in runs]
    finite = all(math.isfinite(v) for v in finals)
    curves = [r["eval_loss"] for r in runs if len(r["eval_loss"]) == len(runs[0]["eval_loss"])]
    steps = runs[0]["eval_steps"]
    mean_curve = [statistics.fmean(c[i] for c in curves) for i in range(len(steps))] if curves else []
    std_curve = [statistics.pstdev(c[i] for c in curves) if len(curves) > 1 else 0.0 for i in range(len(steps))]
    return {"lr": runs[0]["lr"], "seeds": [r["seed"] for r in runs], "final": finals,
            "mean": statistics.fmean(finals) if finite else None,
            "std": (statistics.stdev(finals) if len(finals) > 1 else 0.0) if finite else None,
            "diverged_runs": sum(r["diverged"] for r in runs), "eval_steps": steps, "mean_curve": mean_curve,
            "std_curve": std_curve, "step_ms": statistics.median(r["step_ms"] for r in runs),
            "opt_ms": statistics.median(r["opt_ms"] for r in runs),
            "state_bytes_per_param": runs[0]["state_bytes_per_param"], "n_params": runs[0]["n_params"]}


def steps_to_reach(curve_steps: list[int], curve: list[float], target: float) -> int | None:
    for s, v in zip(curve_steps, curve):
        if s > 0 and v <= target:
            return s
    return None


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke configuration (< 5 min): short runs, one lr")
    parser.add_argument("--tasks", nargs="+", default=["sd_lora", "sd_lokr", "llm_lora"])
    parser.add_argument("--optimizers", nargs="+", default=list(OPTIMIZERS))
    parser.add_argument("--steps", type=int, default=None, help="fine-tuning steps (default 120, quick 8)")
    parser.add_argument("--eval-every", type=int, default=None, help="default 10, quick 4")
    parser.add_argument("--seeds", type=int, default=None, help="seeds at the best lr (default 5, quick 2)")
    parser.add_argument("--sweep-seeds", type=int, default=None, help="seeds per sweep value (default 2, quick 1)")
    parser.add_argument("--ablation-seeds", type=int, default=None, help="seeds per ablation variant (default: --seeds)")
    parser.add_argument("--no-ablation", action="store_true")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--workers", type=int, default=2, help="parallel processes (one thread each by default)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    parser.add_argument("--cache-dir", type=Path, default=ROOT / "output" / "bench_cache",
                        help="pretrained base models, keyed by a hash of their configuration")
    parser.add_argument("--out", type=Path, default=None,
                        help="JSON (default docs/convergence.json; quick: convergence_quick.json; cuda: "
                             "convergence_cuda.json)")
    parser.add_argument("--label", default=None, help="free text stored in the JSON (e.g. 'reduced')")
    args = parser.parse_args(argv)
    quick = args.quick
    steps = args.steps or (8 if quick else 120)
    every = args.eval_every or (4 if quick else 10)
    seeds = args.seeds or (2 if quick else 5)
    sweep_seeds = min(seeds, args.sweep_seeds or (1 if quick else 2))
    ablation_seeds = args.ablation_seeds or seeds
    device_suffix = "" if args.device == "cpu" else "_" + args.device.split(":")[0]  # GPU figures stand apart
    out = args.out or ROOT / "docs" / f"convergence{'_quick' if quick else ''}{device_suffix}.json"
    unknown = set(args.optimizers) - set(OPTIMIZERS)
    if unknown:
        parser.error(f"unknown optimizers {sorted(unknown)} (known: {', '.join(OPTIMIZERS)})")
    started = time.time()
    # one thread per process: on a loaded machine, OpenMP threads spinning on busy cores slow a step many-fold
    torch.set_num_threads(args.threads)

    # pretrain (or load) every base model once, in this process, before the workers start
    descriptions = {}
    for name in args.tasks:
        t0 = time.time()
        task = get_task(name, str(args.cache_dir), args.device, quick)
        descriptions[name] = {"about": type(task).__doc__, **task.describe(), "base_model_cache": task.base_cache,
                              "prepare_s": round(time.time() - t0, 1)}
        print(f"task {name}: ready in {time.time() - t0:.1f}s ({task.base_cache})", flush=True)

    base_job = dict(steps=steps, eval_every=every, device=args.device, cache_dir=str(args.cache_dir), quick=quick,
                    threads=args.threads, variant=None, overrides=None)
    grids = {o: ([TYPICAL_LR.get(o, 1e-3)] if quick else lr_grid(o)) for o in args.optimizers}

    # 1. sweep
    jobs = [dict(base_job, task=t, optimizer=o, lr=lr, seed=s)
            for t in args.tasks for o in args.optimizers for lr in grids[o] for s in range(sweep_seeds)]
    sweep_runs = run_jobs(jobs, args.workers, "sweep")
    best = {}
    for t in args.tasks:
        for o in args.optimizers:
            scores = {lr: mean_final([r for r in sweep_runs if (r["task"], r["optimizer"], r["lr"]) == (t, o, lr)])
                      for lr in grids[o]}
            best[(t, o)] = min(grids[o], key=lambda lr: (scores[lr], lr))

    # 2. all seeds at the best lr; 3. ablation
    jobs = [dict(base_job, task=t, optimizer=o, lr=best[(t, o)], seed=s)
            for t in args.tasks for o in args.optimizers for s in range(sweep_seeds, seeds)]
    ablate = not args.no_ablation and "HinaAdamW" in args.optimizers
    ablation_tasks = [t for t in ABLATION_TASKS if t in args.tasks] if ablate else []
    variants = {t: {v: o for v, o in ablation_variants(hina_kwargs("HinaAdamW", get_task(
        t, str(args.cache_dir), args.device, quick).recipe)).items()
        if v != "full (recipe)" and (not quick or v in QUICK_ABLATION)} for t in ablation_tasks}
    jobs += [dict(base_job, task=t, optimizer="HinaAdamW", lr=best[(t, "HinaAdamW")], seed=s, variant=v,
                  overrides=overrides)
             for t in ablation_tasks for v, overrides in variants[t].items() for s in range(ablation_seeds)]
    more_runs = run_jobs(jobs, args.workers, "seeds+ablation")
    all_runs = sweep_runs + more_runs

    tasks_out = {}
    for t in args.tasks:
        sweep = {o: {str(lr): [r["final_eval"] for r in sweep_runs if (r["task"], r["optimizer"], r["lr"]) == (t, o, lr)]
                     for lr in grids[o]} for o in args.optimizers}
        results = {}
        for o in args.optimizers:
            runs = sorted((r for r in all_runs if r["task"] == t and r["optimizer"] == o and r["variant"] is None
                           and r["lr"] == best[(t, o)]), key=lambda r: r["seed"])
            results[o] = summarize(runs)
        if "AdamW" in results and results["AdamW"]["mean"] is not None:
            target = results["AdamW"]["mean"]
            for o, res in results.items():
                res["steps_to_adamw_final"] = steps_to_reach(res["eval_steps"], res["mean_curve"], target)
        ablation = {}
        if t in ablation_tasks and variants[t]:
            full = sorted((r for r in all_runs if r["task"] == t and r["optimizer"] == "HinaAdamW" and r["variant"] is None
                           and r["lr"] == best[(t, "HinaAdamW")] and r["seed"] < ablation_seeds), key=lambda r: r["seed"])
            ablation["full (recipe)"] = dict(summarize(full), overrides={})
            for v, overrides in variants[t].items():
                runs = sorted((r for r in all_runs if r["task"] == t and r["variant"] == v), key=lambda r: r["seed"])
                ablation[v] = dict(summarize(runs), overrides=overrides)
        tasks_out[t] = {"description": descriptions[t], "lr_grid": {o: grids[o] for o in args.optimizers},
                        "sweep": sweep, "results": results, "ablation": ablation,
                        "hina_recipe": {"name": get_task(t, str(args.cache_dir), args.device, quick).recipe,
                                        "optimizer_args": hina_kwargs("HinaAdamW", get_task(
                                            t, str(args.cache_dir), args.device, quick).recipe)}}

    data = {
        "meta": {"mode": "quick" if quick else "full", "label": args.label,
                 "command": "python benchmarks/convergence.py " + " ".join(argv if argv is not None else sys.argv[1:]),
                 "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                 "wall_s": round(time.time() - started, 1), "steps": steps, "eval_every": every, "seeds": seeds,
                 "sweep_seeds": sweep_seeds, "ablation_seeds": ablation_seeds, "min_8bit_size": MIN_8BIT_SIZE,
                 "sweep_factors": list(SWEEP_FACTORS), "grad_clip": 1.0,
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
