"""Why Automagic_CameAMP collapses at lr >= 1e-3 on the pretrained task: its step is many times the lr.

CAME (arXiv 2307.02047, Algorithm 1) divides its momentum m by the square root of S, an EMA of the update's
instability (U - m)^2 that starts at zero and is not bias-corrected. Early on S holds only (1 - b3) of one
residual, so m / sqrt(S) is several times 1 (seed betas (0.8, 0.99, 0.999): about 8 at the first step), and
for a consistent gradient it keeps growing (m -> U, U - m -> 0). Adam's m_hat / sqrt(v_hat) is at most about 1
per element; CAME's confidence-scaled update is not bounded by anything but ``eps3``. So at the same lr
Automagic_CameAMP moves the weights several times further than AdamW, and an lr that is right for AdamW is
too large for it. The Automagic lr mask cannot help: with lr >= max_lr (1e-3 by default) it caps every
element's lr at max_lr, so lr 1e-3 and 3e-3 train the same.

The fix is Automagic_CameAMP's ``confidence_bias_correction`` (on by default): S / (1 - b3^t), as Adam
corrects its EMAs (the first step becomes m / sqrt(Res) = 0.2 / 0.8 instead of 8). This probe runs
``minilm_cls`` (``benchmarks/tasks.py``) through ``convergence.run_one`` with Automagic_CameAMP in two variants:

- ``default (bias-corrected)``: the optimizer as shipped;
- ``paper (no correction)``: ``confidence_bias_correction=False``, CAME's Algorithm 1 as the paper and the
  reference code (yangluo7/CAME) write it.

Each at the given lrs and seeds, the task's schedule (500 steps, warm-up + cosine), recording the final
held-out loss, accuracy and the update size RMS(step) / lr. (The first version of this probe, commit
before this docstring, also patched CAME's confidence step in-process to clip the update's RMS or drop the
confidence; those figures stay in docs/BENCHMARKS.md.)

    python benchmarks/automagic_probe.py [--lrs 3e-4 1e-3] [--seeds 2] [--out docs/automagic_probe.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import torch  # noqa: E402

import convergence  # noqa: E402
from library.hina_train.saving import atomic_write  # noqa: E402

VARIANTS = {"default (bias-corrected)": None, "paper (no correction)": {"confidence_bias_correction": False}}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lrs", type=float, nargs="+", default=[3e-4, 1e-3])
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS))
    parser.add_argument("--steps", type=int, default=None, help="default: the task's (500)")
    parser.add_argument("--cache-dir", type=Path, default=ROOT / "output" / "bench_cache")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "automagic_probe.json")
    args = parser.parse_args(argv)
    unknown = set(args.variants) - set(VARIANTS)
    if unknown:
        parser.error(f"unknown variants {sorted(unknown)} (known: {', '.join(VARIANTS)})")
    torch.set_num_threads(1)
    task = convergence.get_task("minilm_cls", str(args.cache_dir), "cpu", False)
    steps = args.steps or task.steps
    cache = args.cache_dir / f"runs_{args.out.stem}.jsonl"
    done = convergence.load_cached_runs(cache)
    started, rows = time.time(), []
    for variant in args.variants:
        for lr in args.lrs:
            runs = []
            for seed in range(args.seeds):
                job = dict(task="minilm_cls", optimizer="Automagic_CameAMP", lr=lr, seed=seed, variant=variant,
                           overrides=VARIANTS[variant], steps=steps, eval_every=task.eval_every, warmup=task.warmup,
                           device="cpu", cache_dir=str(args.cache_dir), quick=False, threads=1)
                key = convergence.job_key(job)
                if key not in done:
                    done[key] = convergence.finite_or_none(convergence.run_one(job))
                    with open(cache, "a") as f:
                        f.write(json.dumps({"key": key, "result": done[key]}) + "\n")
                r = done[key]
                runs.append(r)
                print(f"[{time.time() - started:5.0f}s] {variant:28s} lr={lr:<7g} seed={seed} "
                      f"final={r['final_eval']} acc={r['eval_accuracy'][-1] if r['eval_accuracy'] else None} "
                      f"update/lr={statistics.median(r['update_rms_per_lr']):.2f}", flush=True)
            finals = [r["final_eval"] for r in runs]
            finite = all(v is not None for v in finals)
            rows.append({"variant": variant, "lr": lr, "seeds": list(range(args.seeds)), "final": finals,
                         "mean": statistics.fmean(finals) if finite else None,
                         "accuracy": [r["eval_accuracy"][-1] for r in runs],
                         "update_rms_first10": statistics.fmean(v for r in runs for v in r["update_rms_per_lr"][:10]),
                         "update_rms_median": statistics.median(v for r in runs for v in r["update_rms_per_lr"]),
                         "update_rms_max": max(v for r in runs for v in r["update_rms_per_lr"])})
    data = {"meta": {"command": "python benchmarks/automagic_probe.py " + " ".join(
        argv if argv is not None else sys.argv[1:]), "steps": steps, "task": "minilm_cls",
        "wall_s": round(time.time() - started, 1), "machine": convergence.machine_info(
            argparse.Namespace(device="cpu", workers=1, threads=1))}, "rows": rows}
    text = json.dumps(data, indent=1) + "\n"
    atomic_write(args.out, lambda tmp: Path(tmp).write_text(text))
    print(f"wrote {args.out}")
    return data


if __name__ == "__main__":
    main()
