"""Why Automagic_CameAMP collapses at lr >= 1e-3 on the pretrained task: its step is many times the lr.

CAME (arXiv 2307.02047, Algorithm 1) divides its momentum m by the square root of S, an EMA of the update's
instability (U - m)^2 that starts at zero and is not bias-corrected. Early on S holds only (1 - b3) of one
residual, so m / sqrt(S) is several times 1 (seed betas (0.8, 0.99, 0.999): about 8 at the first step), and
for a consistent gradient it keeps growing (m -> U, U - m -> 0). Adam's m_hat / sqrt(v_hat) is at most about 1
per element; CAME's confidence-scaled update is not bounded by anything but ``eps3``. So at the same lr
Automagic_CameAMP moves the weights several times further than AdamW, and an lr that is right for AdamW is
too large for it. The Automagic lr mask cannot help: with lr >= max_lr (1e-3 by default) it caps every
element's lr at max_lr, so lr 1e-3 and 3e-3 train the same.

This probe runs ``minilm_cls`` (``benchmarks/tasks.py``) through ``convergence.run_one`` with
Automagic_CameAMP as shipped and with CAME's confidence step changed in this process only (a patch of
``library.hina.techniques.came.confidence_``, never committed to the optimizer):

- ``as shipped``;
- ``confidence bias-corrected``: S / (1 - b3^t), as Adam corrects its EMAs (the first step becomes
  m / sqrt(Res) = 0.2 / 0.8 instead of 8);
- ``update RMS clipped to 1``: the confidence-scaled update of each tensor rescaled to RMS <= 1 (CAME's own
  clip, d = 1, applied once more after the confidence), so a step is at most about the lr;
- ``no confidence``: update = m (CAME without its confidence step, i.e. Adafactor-style with momentum).

Each at the given lrs and seeds, the task's schedule (500 steps, warm-up + cosine), recording the final
held-out loss, accuracy and the update size RMS(step) / lr.

    python benchmarks/automagic_probe.py [--lrs 3e-4 1e-3] [--seeds 2] [--out docs/automagic_probe.json]
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import torch  # noqa: E402

import convergence  # noqa: E402
from library.hina.techniques import came  # noqa: E402
from library.hina_train.saving import atomic_write  # noqa: E402

SHIPPED = came.confidence_


def _bias_corrected(counts: dict):
    def confidence_(exp_avg, normalized, out, state, beta3, eps2, eps3):
        SHIPPED(exp_avg, normalized, out, state, beta3, eps2, eps3)
        if came.is_factored(exp_avg.shape):
            key = id(state["exp_avg_res_row"])
            counts[key] = counts.get(key, 0) + 1
            out.mul_(math.sqrt(1.0 - beta3 ** counts[key]))  # m / sqrt(S / (1 - b3^t))
    return confidence_


def _rms_clipped(exp_avg, normalized, out, state, beta3, eps2, eps3):
    SHIPPED(exp_avg, normalized, out, state, beta3, eps2, eps3)
    rms = out.square().mean().sqrt()
    out.div_(rms.clamp_min(1.0))


def _no_confidence(exp_avg, normalized, out, state, beta3, eps2, eps3):
    out.copy_(exp_avg)


def patches() -> dict:
    return {"as shipped": lambda: SHIPPED, "confidence bias-corrected": lambda: _bias_corrected({}),
            "update RMS clipped to 1": lambda: _rms_clipped, "no confidence": lambda: _no_confidence}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lrs", type=float, nargs="+", default=[3e-4, 1e-3])
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--variants", nargs="+", default=list(patches()))
    parser.add_argument("--steps", type=int, default=None, help="default: the task's (500)")
    parser.add_argument("--cache-dir", type=Path, default=ROOT / "output" / "bench_cache")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "automagic_probe.json")
    args = parser.parse_args(argv)
    unknown = set(args.variants) - set(patches())
    if unknown:
        parser.error(f"unknown variants {sorted(unknown)} (known: {', '.join(patches())})")
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
                           overrides=None, steps=steps, eval_every=task.eval_every, warmup=task.warmup,
                           device="cpu", cache_dir=str(args.cache_dir), quick=False, threads=1)
                key = convergence.job_key(job)
                if key not in done:
                    came.confidence_ = patches()[variant]()
                    try:
                        done[key] = convergence.finite_or_none(convergence.run_one(job))
                    finally:
                        came.confidence_ = SHIPPED
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
