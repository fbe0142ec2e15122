"""Generate ``docs/BENCHMARKS.md`` and its plots from the benchmark JSON files (nothing is measured here).

Reads ``docs/convergence.json`` (``benchmarks/convergence.py``) and, when present, ``docs/step_speed.md``
(``benchmarks/step_speed.py``); writes ``docs/BENCHMARKS.md``, ``docs/convergence_<task>.png`` (eval-loss
curves, mean ± std over seeds) and ``docs/ablation_<task>.png``. Another run's JSON keeps its own files: the
part of its name after ``convergence`` (``convergence_cuda.json`` -> ``_cuda``) goes into every name written
or read (``BENCHMARKS_cuda.md``, ``convergence_cuda_<task>.png``, ``step_speed_cuda.md``), so GPU figures
stand beside the CPU ones instead of replacing them.

    python benchmarks/report.py [--convergence docs/convergence.json] [--docs docs]

Comparison rule used in the text: a difference of means counts as real only if it exceeds twice its standard
error; otherwise it is reported as "no clear difference". Runs with the same seeds share batches, noise and
adapter initialisation, so the standard error is the paired one (std of the per-seed differences / sqrt(n));
otherwise sqrt(s1²/n1 + s2²/n2). A difference below 0.1 % of the reference mean is called negligible.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from library.hina_train.saving import atomic_write  # noqa: E402

TASK_TITLES = {"sd_lora": "Task 1: SD LoRA (tiny SD UNet, networks.lora)",
               "sd_lokr": "Task 2: SD LoKr (tiny SD UNet, networks.lokr)",
               "llm_lora": "Task 3: LLM LoRA (tiny GPT-2, peft)",
               "minilm_cls": "Pretrained: all-MiniLM-L6-v2 + peft LoRA, topic classification"}
# docs/BENCHMARKS.md is built from these, in this order: the pretrained model first (what users train), then the
# tiny from-scratch tasks
DEFAULT_JSONS = ("convergence_minilm_defaults.json", "convergence_minilm_adaptive.json", "convergence_long.json",
                 "convergence_llm_grams.json", "convergence_llm_automagic.json", "convergence_defaults.json",
                 "convergence_minilm.json", "convergence_minilm_short.json", "convergence.json")
FINDINGS_START, FINDINGS_END = "<!-- findings:start -->", "<!-- findings:end -->"  # hand-written, kept on rebuild
NEGLIGIBLE = 1e-3  # differences below 0.1 % of the reference mean are called negligible, however consistent
HINA_PREFIXES = ("Hina", "AdamW_Hina", "AdamWBF16", "Automagic")


def fmt(value, digits=4):
    return "–" if value is None else f"{value:.{digits}f}"


def compare(a: dict, b: dict) -> tuple[float | None, float | None, str]:
    """(mean_a - mean_b, its standard error, verdict for a vs b: lower loss is better)."""
    if a.get("mean") is None or b.get("mean") is None:
        return None, None, "diverged"
    diff = a["mean"] - b["mean"]
    if a.get("seeds") == b.get("seeds") and len(a["final"]) > 1:
        # paired: the same seeds give both optimizers the same batches, noise and adapter initialisation
        d = [x - y for x, y in zip(a["final"], b["final"])]
        n = len(d)
        se = math.sqrt(sum((v - diff) ** 2 for v in d) / (n - 1) / n)
    else:
        na, nb = len(a["final"]), len(b["final"])
        se = math.sqrt((a["std"] or 0) ** 2 / na + (b["std"] or 0) ** 2 / nb)
    if se == 0 and diff == 0:
        return diff, se, "identical"
    if abs(diff) < NEGLIGIBLE * abs(b["mean"]):
        return diff, se, "negligible (< 0.1 %)"
    if abs(diff) <= 2 * se:
        return diff, se, "no clear difference"
    return diff, se, "lower (better)" if diff < 0 else "higher (worse)"


def _curve_style(name: str, res: dict, color) -> dict:
    """One optimizer's line in a per-step plot: labelled with its lr; Hina optimizers solid and thicker."""
    hina = name.startswith(HINA_PREFIXES)
    return dict(label=f"{name} (lr {res['lr']:g})", color=color, lw=1.8 if hina else 1.4, ls="-" if hina else "--")


def _save_figure(fig, path: Path) -> None:
    """Lay out, write atomically (a crash never leaves a truncated PNG), and free the figure."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110))
    plt.close(fig)


def plot_curves(task: str, data: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = data["results"]
    fig, ax = plt.subplots(figsize=(8, 5))
    cmap = plt.get_cmap("tab20")
    for i, (name, res) in enumerate(results.items()):
        if not res["mean_curve"]:
            continue
        steps, mean, std = res["eval_steps"], res["mean_curve"], res["std_curve"]
        ax.plot(steps, mean, **_curve_style(name, res, cmap(i)))
        ax.fill_between(steps, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)],
                        color=cmap(i), alpha=0.15)
    ax.set_xlabel("fine-tuning step")
    ax.set_ylabel("held-out eval loss")
    ax.set_title(f"{TASK_TITLES.get(task, task)}: mean ± std over seeds, best lr each")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    _save_figure(fig, path)


def plot_ablation(task: str, ablation: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n, r in ablation.items() if r.get("mean") is not None]
    means = [ablation[n]["mean"] for n in names]
    stds = [ablation[n]["std"] for n in names]
    fig, ax = plt.subplots(figsize=(7, 0.35 * len(names) + 1.5))
    ax.barh(range(len(names)), means, xerr=stds, color=["tab:blue" if n == "full (recipe)" else "tab:gray"
                                                         for n in names], alpha=0.8, capsize=3)
    ax.set_yticks(range(len(names)), names)
    ax.invert_yaxis()
    lo = min(m - s for m, s in zip(means, stds))
    hi = max(m + s for m, s in zip(means, stds))
    ax.set_xlim(lo - 0.1 * (hi - lo), hi + 0.1 * (hi - lo))
    ax.set_xlabel("final held-out eval loss (mean ± std over seeds; lower is better)")
    ax.set_title(f"HinaAdamW ablation, {task}")
    _save_figure(fig, path)


def convergence_section(conv: dict, docs: Path, plots: bool, variant: str = "") -> list[str]:
    meta = conv["meta"]
    lines = []
    for task, data in conv["tasks"].items():
        results = data["results"]
        d = data["description"]
        lines += [f"### {TASK_TITLES.get(task, task)}", "", f"{d['about'].strip()}", ""]
        details = {k: v for k, v in d.items() if k not in ("about", "base_model_cache", "prepare_s")}
        lines += ["<details><summary>task settings</summary>", "", "```json", json.dumps(details, indent=1),
                  "```", "", "</details>", ""]
        ref_name = "AdamW8bit" if "AdamW8bit" in results else "AdamW"
        ref = results.get(ref_name)
        has_acc = any("accuracy_mean" in r for r in results.values())
        steps = data.get("steps", meta["steps"])
        schedule = "constant lr" if data.get("warmup", meta.get("warmup")) is None else \
            f"{data.get('warmup', meta.get('warmup')):.0%} warm-up + cosine"
        counts = sorted({len(r["final"]) for r in results.values()})
        seeds = (f"{counts[0]} seeds" if len(counts) == 1 else
                 f"{counts[0]}–{counts[-1]} seeds (n after the loss: an interrupted run, gathered with --cached-only)")
        lines += [f"{steps} steps, {schedule}, {seeds} at each optimizer's "
                  f"best lr. *vs {ref_name}*: paired difference of the final held-out loss (2-standard-error rule; "
                  "unpaired where the seeds differ).", "",
                  "| optimizer | best lr | final eval loss (mean ± std) | vs " + ref_name + " | " +
                  ("accuracy | " if has_acc else "") + "best-step loss | train/held-out gap | update RMS/lr | "
                  "steps to AdamW's final | step ms | state B/param |",
                  "|---|---|---|---|" + ("---|" if has_acc else "") + "---|---|---|---|---|---|"]
        order = sorted(results, key=lambda o: (results[o]["mean"] is None, results[o]["mean"] or 0))
        for o in order:
            r = results[o]
            if ref and o != ref_name:
                diff, se, verdict = compare(r, ref)
                vs = f"{diff:+.4f} ({100 * diff / ref['mean']:+.1f} %; {verdict})" if diff is not None else verdict
            else:
                vs = "—"
            reach = r.get("steps_to_adamw_final")
            reach = "not reached" if reach is None else str(reach)
            mean = f"{fmt(r['mean'])} ± {fmt(r['std'])}" if r["mean"] is not None else \
                f"diverged in {r['diverged_runs']} of {len(r['final'])} seeds"
            if len(counts) > 1:
                mean += f" (n={len(r['final'])})"
            acc = (f"{fmt(r.get('accuracy_mean'), 3)} ± {fmt(r.get('accuracy_std'), 3)} | " if has_acc else "")
            lines.append(f"| {o} | {r['lr']:g} | {mean} | {vs} | {acc}{fmt(r.get('best_eval_mean'))} | "
                         f"{fmt(r.get('gap_mean'))} | {fmt(r.get('update_rms_median'), 2)} | {reach} | "
                         f"{r['step_ms']:.1f} | {r['state_bytes_per_param']:.2f} |")
        lines += ["", "*best-step loss*: mean over seeds of the lowest held-out loss seen at any evaluation (the "
                  "final one is what the table ranks); *train/held-out gap*: final held-out loss minus the mean "
                  "training loss of the last 10 % of steps (overfitting shows as a growing gap); *update RMS/lr*: "
                  "median over steps of RMS(θ_new − θ_old) / lr, the size of a step in units of the lr it was given "
                  "(Adam: below 1).", ""]
        width = max(len(sw) for sw in data["sweep"].values())
        if meta["mode"] == "long":
            grid = ("each optimizer's best lr of the short sweep (`--best-from`) and, where they were run, the short "
                    "grid's values on either side of it (×3 or ×1/3 past the grid's edge); **(best)** marks the lr of "
                    "the table's row")
        else:
            grid = ("grid ×" + ", ×".join(f"{f:.3g}" for f in meta["sweep_factors"]) + " the optimizer's typical lr"
                    + (", plus ×" + " and ×".join(f"{f:g}" for f in meta["refine_factors"]) + " its best grid value"
                       if meta.get("refine_factors") else ""))
        lines += [f"Learning-rate sweep (final eval loss per seed, {meta['sweep_seeds']} seed(s) per value; {grid}):",
                  "", "| optimizer | " + " | ".join(f"lr {i + 1}" for i in range(width)) + " |",
                  "|---|" + "---|" * width]
        for o, sweep in data["sweep"].items():
            if o not in results:  # planned, but no run finished (a --cached-only gathering)
                continue
            cells = []
            for lr, values in sweep.items():
                shown = ", ".join("nan" if v is None else f"{v:.4f}" for v in values)
                cells.append(f"{float(lr):g}: {shown}" + (" **(best)**" if float(lr) == results[o]["lr"] else ""))
            lines.append(f"| {o} | " + " | ".join(cells + [""] * (width - len(cells))) + " |")
        lines.append("")
        if plots:
            png = docs / f"convergence{variant}_{task}.png"
            plot_curves(task, data, png)
            lines += [f"![{task} eval-loss curves]({png.name})", ""]
    return lines


def headline(conv: dict) -> list[str]:
    lines = []
    for task, data in conv["tasks"].items():
        res = data["results"]
        for hina in [o for o in res if o.split(":")[0] == "HinaAdamW"]:
            label = hina + (f" (recipe {data['task_recipe']})" if hina == "HinaAdamW" and data.get("task_recipe")
                            else "")
            for peer in ("AdamW8bit", "AdamW"):
                if peer not in res:
                    continue
                diff, se, verdict = compare(res[hina], res[peer])
                if diff is None:
                    lines.append(f"- **{task}**, {label} vs {peer}: a run diverged ({verdict}).")
                    continue
                rel = 100 * diff / res[peer]["mean"]
                lines.append(f"- **{task}**, {label} vs {peer}: final eval loss {fmt(res[hina]['mean'])} vs "
                             f"{fmt(res[peer]['mean'])}, difference {diff:+.4f} ({rel:+.2f} %, standard error "
                             f"{se:.4f}): **{verdict}**.")
        if "HinaAdamW" in res and "AdamW" in res:
            lines.append(f"- **{task}**, convergence speed: " + speed_line(res, data.get("steps", conv["meta"]["steps"])))
    lines.append("")
    return lines


def settings_table(conv: dict) -> list[str]:
    """Every HinaAdamW setting of the run against AdamW8bit, one column per task (each at its own best lr, paired
    over the same seeds): where a setting is better, equal or worse. Empty without AdamW8bit or with fewer than
    two HinaAdamW settings."""
    tasks = [t for t, d in conv["tasks"].items() if "AdamW8bit" in d["results"]]
    settings = []
    for t in tasks:
        settings += [o for o in conv["tasks"][t]["results"] if o.split(":")[0].split("+")[0] == "HinaAdamW"
                     and o not in settings]
    if not tasks or len(settings) < 2:
        return []
    lines = ["HinaAdamW settings against AdamW8bit (final held-out loss, difference of means in % of AdamW8bit's, "
             "paired 2-standard-error verdict; each at its own best lr):", "",
             "| HinaAdamW setting | " + " | ".join(tasks) + " |", "|---|" + "---|" * len(tasks)]
    short = {"lower (better)": "better", "higher (worse)": "worse", "no clear difference": "no clear difference",
             "negligible (< 0.1 %)": "equal", "identical": "identical", "diverged": "diverged"}
    for o in settings:
        cells = []
        for t in tasks:
            res = conv["tasks"][t]["results"]
            if o not in res:
                cells.append("–")
                continue
            diff, _, verdict = compare(res[o], res["AdamW8bit"])
            rel = "" if diff is None else f"{100 * diff / res['AdamW8bit']['mean']:+.1f} %, "
            cells.append(f"{rel}{short[verdict]} (lr {res[o]['lr']:g})")
        label = o + (" (task recipe)" if o == "HinaAdamW" else "")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines + [""]


def speed_line(res: dict, steps: int) -> str:
    """Convergence speed in the seed documents' sense: steps HinaAdamW needs to reach AdamW's final eval loss."""
    reach = res["HinaAdamW"].get("steps_to_adamw_final")
    if reach is None:
        return f"HinaAdamW's mean curve did not reach AdamW's mean final loss within {steps} steps."
    return (f"HinaAdamW's mean curve reached AdamW's mean final loss at step {reach} of {steps} "
            f"({100 * (1 - reach / steps):.0f} % fewer steps; evaluations every "
            f"{res['HinaAdamW']['eval_steps'][1] - res['HinaAdamW']['eval_steps'][0]} steps).")


def ablation_section(conv: dict, docs: Path, plots: bool, variant: str = "") -> list[str]:
    lines = []
    for task, data in conv["tasks"].items():
        ab = data.get("ablation") or {}
        if "full (recipe)" not in ab:  # none, or the long mode's per-feature ablation (long_ablation_section)
            continue
        full = ab["full (recipe)"]
        lines += [f"### Ablation on {task} ({data.get('ablation_of', 'HinaAdamW')}, recipe "
                  f"`{data['hina_recipe']['name']}`, lr {full['lr']:g}, {len(full['final'])} seeds)", "",
                  f"Recipe args: `{json.dumps(data['hina_recipe']['optimizer_args'])}`; every variant runs at the same "
                  "lr (the full recipe's best), so a variant that would want another lr is at a disadvantage; "
                  "'all off' is 8-bit AdamW inside HinaAdamW (compare AdamW8bit in the table above, swept on its own).",
                  "", "| variant | final eval loss (mean ± std) | Δ vs full | verdict for the variant | accuracy | "
                  "update RMS/lr |", "|---|---|---|---|---|---|"]
        for name, r in ab.items():
            extra = f" {fmt(r.get('accuracy_mean'), 3)} | {fmt(r.get('update_rms_median'), 2)} |"
            if name == "full (recipe)":
                lines.append(f"| **full (recipe)** | {fmt(r['mean'])} ± {fmt(r['std'])} | — | — |{extra}")
                continue
            diff, se, verdict = compare(r, full)
            dtxt = "–" if diff is None else f"{diff:+.5f} ({100 * diff / full['mean']:+.2f} %, SE {se:.5f})"
            mean = f"{fmt(r['mean'])} ± {fmt(r['std'])}" if r["mean"] is not None else "diverged"
            lines.append(f"| {name} | {mean} | {dtxt} | {verdict} |{extra}")
        lines += ["", "'no dynamic wd' can only differ after `wd_transition_steps` (800–1200 in the recipes, 1000 by "
                  f"default), i.e. not within these {data.get('steps', conv['meta']['steps'])}-step runs.", "",
                  "Read: for *no X* (X is on in the recipe), a *lower* loss than the full recipe means X hurt on this "
                  "task and *higher* means it helped; for *+ X* (X is off in the recipe), *lower* means X would help.",
                  ""]
        if plots:
            png = docs / f"ablation{variant}_{task}.png"
            plot_ablation(task, ab, png)
            lines += [f"![ablation {task}]({png.name})", ""]
    return lines


def overfitting_section(conv: dict, docs: Path | None = None, plots: bool = False, variant: str = "") -> list[str]:
    """Per task: final vs best-step held-out loss, train/held-out gap, and the stability figures: the spread over
    seeds and the fluctuation within a run over the last 20 % of steps (JSONs written before those two existed
    show their pooled spread instead). With ``plots`` (long runs): the gap along the run and the stability bars."""
    lines = []
    for task, data in conv["tasks"].items():
        results = data["results"]
        if not any("best_eval_mean" in r for r in results.values()):
            continue
        split = any(r.get("late_time_std") is not None for r in results.values())
        steps = data.get("steps", conv["meta"]["steps"])
        spread_cols = "seed spread, last 20 % | fluctuation, last 20 % |" if split else "spread over the last 20 % |"
        lines += [f"### {task}: overfitting and stability ({steps} steps)", "",
                  "| optimizer | lr | final held-out loss (mean ± seed std) | best-step loss | best step (per seed) | "
                  "final − best | train/held-out gap | " + spread_cols,
                  "|---|---|---|---|---|---|---|---|" + ("---|" if split else "")]
        for o, r in sorted(results.items(), key=lambda kv: (kv[1]["mean"] is None, kv[1]["mean"] or 0)):
            if r.get("best_eval_mean") is None:
                lines.append(f"| {o} | {r['lr']:g} | diverged in {r['diverged_runs']} of {len(r['final'])} seeds "
                             "| | | | |" + (" |" if split else "") + " |")
                continue
            spread = (f"{fmt(r.get('late_seed_std'), 5)} | {fmt(r.get('late_time_std'), 5)} |" if split
                      else f"{fmt(r.get('last20_spread'))} |")
            lines.append(f"| {o} | {r['lr']:g} | {fmt(r['mean'])} ± {fmt(r['std'])} | {fmt(r['best_eval_mean'])} | "
                         f"{', '.join(str(x) for x in r['best_eval_step'])} | {r['mean'] - r['best_eval_mean']:+.4f} | "
                         f"{fmt(r.get('gap_mean'))} | {spread}")
        lines += ["", "*final − best*: how much held-out loss the run gave back after its best evaluation (0: still "
                  "improving at the end); *train/held-out gap*: final held-out loss minus the mean training loss "
                  "of the last 10 % of steps; "
                  + ("*seed spread, last 20 %*: standard deviation over seeds of the held-out loss, averaged over the "
                     "evaluations in the last 20 % of steps; *fluctuation, last 20 %*: standard deviation of each "
                     "seed's held-out loss around its straight-line trend over those evaluations, averaged over seeds "
                     "(training stability: both small means a run ends where another seed's run ends, and settles); "
                     if split else
                     "*spread over the last 20 %*: standard deviation of the held-out loss over the evaluations in "
                     "the last 20 % of steps and over seeds (training stability); ")
                  + "*± seed std*: the spread of the final loss over seeds.", ""]
        if plots and docs is not None and split:
            gap_png = docs / f"convergence{variant}_overfitting_{task}.png"
            stability_png = docs / f"convergence{variant}_stability_{task}.png"
            plot_gap(task, results, gap_png)
            plot_stability(task, results, stability_png)
            lines += [f"![{task} train/held-out gap along the run]({gap_png.name})", "",
                      f"![{task} stability]({stability_png.name})", ""]
    return lines


def plot_gap(task: str, results: dict, path: Path) -> None:
    """Held-out loss minus the training loss of the steps before each evaluation, mean over seeds, per optimizer:
    a gap that grows late in the run is overfitting."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    cmap = plt.get_cmap("tab20")
    for i, (name, res) in enumerate(results.items()):
        train = res.get("train_curve") or []
        points = [(s, m - t) for s, m, t in zip(res["eval_steps"], res["mean_curve"], train) if t is not None]
        if not points:
            continue
        ax.plot(*zip(*points), **_curve_style(name, res, cmap(i)))
    ax.axhline(0, color="black", lw=0.6)
    ax.set_xlabel("fine-tuning step")
    ax.set_ylabel("held-out − training loss (mean over seeds)")
    ax.set_title(f"{TASK_TITLES.get(task, task)}: train/held-out gap")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    _save_figure(fig, path)


def plot_stability(task: str, results: dict, path: Path) -> None:
    """Per optimizer, two bars: the spread over seeds and the fluctuation within a run, both over the last 20 % of
    steps (``convergence.summarize``'s ``late_seed_std`` and ``late_time_std``)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n, r in results.items() if r.get("late_time_std") is not None]
    names.sort(key=lambda n: results[n]["mean"])
    seed = [results[n].get("late_seed_std") or 0.0 for n in names]
    time_ = [results[n]["late_time_std"] for n in names]
    fig, ax = plt.subplots(figsize=(8, 0.45 * len(names) + 1.8))
    y = range(len(names))
    ax.barh([i - 0.2 for i in y], seed, height=0.4, color="tab:blue", label="spread over seeds")
    ax.barh([i + 0.2 for i in y], time_, height=0.4, color="tab:orange", label="fluctuation within a run")
    ax.set_yticks(list(y), [f"{n} (lr {results[n]['lr']:g})" for n in names])
    ax.invert_yaxis()
    ax.set_xlabel("std of the held-out loss, last 20 % of steps (lower is steadier)")
    ax.set_title(f"{task}: training stability")
    ax.legend(fontsize=8)
    _save_figure(fig, path)


def long_ablation_section(conv: dict) -> list[str]:
    """--long: each long-horizon feature switched off on the optimizer that has it, paired with the same seeds."""
    lines = []
    for task, data in conv["tasks"].items():
        rows = {n: r for n, r in (data.get("ablation") or {}).items() if "reference" in r}
        if not rows:
            continue
        lines += [f"### {task}: long-horizon features switched off", "",
                  "| feature switched off | lr | with (mean ± std) | without (mean ± std) | Δ without − with | "
                  "verdict for switching it off |", "|---|---|---|---|---|---|"]
        for name, r in rows.items():
            ref = r["reference"]
            diff, se, verdict = compare(r, ref)
            dtxt = "–" if diff is None else f"{diff:+.5f} ({100 * diff / ref['mean']:+.2f} %, SE {se:.5f})"
            lines.append(f"| {name} (`{json.dumps(r['overrides'])}`) | {r['lr']:g} | {fmt(ref['mean'])} ± "
                         f"{fmt(ref['std'])} | {fmt(r['mean'])} ± {fmt(r['std'])} | {dtxt} | {verdict} |")
        lines += ["", "Lower without the feature means the feature hurt at this horizon; higher means it helped.", ""]
    return lines


def step_speed_section(docs: Path, variant: str = "") -> list[str]:
    """The step-speed report that ``benchmarks/step_speed.py --markdown docs/step_speed.md`` writes, embedded."""
    path = docs / f"step_speed{variant}.md"
    lines = ["## Step speed and state memory (`benchmarks/step_speed.py`)", ""]
    if not path.is_file():
        return lines + [f"Not yet run here: `docs/{path.name}` is written by `python benchmarks/step_speed.py "
                        f"--json docs/step_speed{variant}.json --markdown docs/{path.name}`.", ""]
    body = path.read_text().splitlines()[1:]  # its own title is replaced by the heading above
    return lines + [("#" + line) if line.startswith("## ") else line for line in body] + [""]


def variant_of(conv_path: Path) -> str:
    """'' for convergence.json, '_cuda' for convergence_cuda.json: the suffix every written file name carries."""
    stem = conv_path.stem
    return stem[len("convergence"):] if stem.startswith("convergence") else f"_{stem}"


def run_sections(conv_path: Path, docs: Path, plots: bool, with_speed: bool) -> list[str]:
    """Everything one convergence JSON says: how it was run, headline, tables, ablation, limits."""
    conv = json.loads(conv_path.read_text())
    variant = variant_of(conv_path)
    meta = conv["meta"]
    m = meta["machine"]
    tasks = ", ".join(conv["tasks"])
    lines = [f"# From `{conv_path.name}` ({tasks})", ""]
    if meta.get("label"):
        lines += [f"> **Configuration: {meta['mode']}, {meta['label']}.**", ""]
    lines += ["## How it was run", "", "```", meta["command"], "python benchmarks/report.py", "```", "",
              f"- date {meta['date']}, wall time {meta['wall_s'] / 60:.1f} min; git {m.get('git_commit')}",
              f"- machine: {m['cpu']} ({m['cpu_count']} CPUs visible), {m['platform']}, device `{m['device']}`"
              + (f" ({m['gpu']})" if m.get("gpu") else ""),
              f"- {m['workers']} worker process(es) × {m['threads_per_worker']} torch thread(s) in parallel, so the ms "
              "columns compare optimizers within this run only (noisy; `benchmarks/step_speed.py` is the speed "
              "benchmark)",
              "- versions: python " + m["python"] + ", " + ", ".join(f"{k} {v}" for k, v in m["versions"].items()),
              f"- {meta['steps']} fine-tuning steps per run, eval every {meta['eval_every']} steps, {meta['seeds']} seeds "
              f"at the best lr, {meta['sweep_seeds']} seed(s) per sweep value, {meta.get('ablation_seeds', meta['seeds'])}"
              f" seeds per ablation variant; gradient clipping {meta['grad_clip']}; "
              + ("constant lr" if meta.get("warmup") is None else f"{meta['warmup']:.0%} warm-up + cosine decay"),
              f"- 8-bit states threshold set to {meta.get('min_8bit_size')} elements for AdamW8bit and the 8-bit Hina "
              "optimizers (the tiny adapters' tensors are below the libraries' default thresholds, which would "
              "silently keep fp32 states)", "",
              *missing_runs_lines(meta),
              "Protocol:", "", meta["protocol"], "",
              "Columns: *final eval loss* is the held-out loss after the last step; *vs AdamW* is the difference of "
              "means with the verdict of the 2-standard-error rule (paired over seeds: same seed = same batches, noise "
              "and adapter initialisation for every optimizer); *steps to AdamW's final* is the first evaluation "
              "step at which the optimizer's mean curve is at or below AdamW's mean final loss; *step ms* is the "
              "median of forward + backward + clip + step; *opt.step ms* the median of `optimizer.step()`; *state "
              "B/param* is the bytes of `optimizer.state` tensors per trained parameter (on these tiny adapters; "
              "fixed per-tensor overheads weigh more than at full scale).", ""]
    lines += ["## Headline: HinaAdamW against AdamW and AdamW8bit", ""] + settings_table(conv) + headline(conv)
    lines += ["## Convergence (`benchmarks/convergence.py`)", ""]
    lines += convergence_section(conv, docs, plots, variant)
    ablation = ablation_section(conv, docs, plots, variant)
    if ablation:
        lines += ["## Ablation: HinaAdamW techniques switched off one at a time", ""] + ablation
    long_ablation = long_ablation_section(conv)
    if long_ablation:
        lines += ["## Long horizon: the features written for long runs, switched off", ""] + long_ablation
    overfitting = overfitting_section(conv, docs, plots and meta["mode"] == "long", variant)
    if overfitting:
        lines += ["## Overfitting and stability", ""] + overfitting
    if with_speed:
        lines += step_speed_section(docs, variant)
    edges = sorted(f"{o} on {t} ({r['lr']:g})" for t, d in conv["tasks"].items() for o, r in d["results"].items()
                   if len(d["lr_grid"][o]) > 1 and r["lr"] in (min(d["lr_grid"][o]), max(d["lr_grid"][o])))
    lines += ["## Limits of these measurements", ""]
    if edges:
        factors = meta.get("sweep_factors") or []
        grid = f"×{min(factors):.3g}..×{max(factors):.3g} " if factors else ""
        lines.append(f"- The best lr sits at an edge of the {grid}grid for: " + "; ".join(edges) + ". A wider "
                     "sweep could move those optimizers' results.")
    if any(t != "minilm_cls" for t in conv["tasks"]):
        lines += [
            "- The models are tiny (tens of thousands of adapter parameters) and the runs short, so that the "
            "suite runs on 2 CPU cores; effects at SD/LLM scale and over thousands of steps can differ.",
            "- The diffusion tasks bypass the (random-weight) tiny VAE: the UNet denoises 8×8 4-channel images "
            "directly (see `benchmarks/tasks.py`)."]
    if "minilm_cls" in conv["tasks"]:
        lines.append("- One small pretrained encoder with LoRA on its top layer only (the frozen layers' outputs are "
                     "cached to fit the 2-core budget) and a few hundred training sentences: a real fine-tune, but "
                     "one model and one task.")
    if meta["mode"] == "long":
        checked = sum(len(d["sweep"].get(o, {})) >= 3 for d in conv["tasks"].values() for o in d["results"])
        rows = sum(len(d["results"]) for d in conv["tasks"].values())
        if checked == rows:
            lines += ["- Each optimizer's lr comes from a short (120-step, constant-lr) sweep (`--best-from`) and was "
                      f"checked at this horizon against the short grid's neighbours on both sides with {meta['sweep_seeds']} "
                      "seed(s) (the sweep table of each task), not swept over a full grid here.", ""]
        else:
            lines += [f"- Each optimizer runs at the best lr of a short (120-step, constant-lr) sweep (`--best-from`); "
                      f"{checked} of the {rows} rows were checked against neighbouring lrs at this horizon (the sweep "
                      "tables: a lower and a higher one), the others not: the best lr of a long warm-up + cosine run "
                      "can differ.", ""]
    else:
        lines += ["- Optimizers whose recipes assume long runs (Automagic's lr-mask warm-up of 500 steps, the "
                  "adaptive optimizers' relationship discovery every 100 steps, the dynamic weight-decay transition "
                  "at 800–1200 steps) do not reach those phases within these runs; they run at their constructor "
                  "defaults (only the lr is swept), which is what a user gets.", ""]
    return [("#" + line) if line.startswith("#") else line for line in lines]


def missing_runs_lines(meta: dict) -> list[str]:
    """The runs a --cached-only gathering left out (not finished when the run was stopped), named."""
    missing = meta.get("missing_runs")
    if not missing:
        return []
    seeds: dict[str, list[int]] = {}
    for m in missing:
        name = f"{m['task']} {m['optimizer']}" + (f" ({m['variant']})" if m["variant"] else "") + f" lr {m['lr']:g}"
        seeds.setdefault(name, []).append(m["seed"])
    return [f"- **{len(missing)} planned runs did not finish and are left out** (gathered with `--cached-only`): "
            + "; ".join(f"{name} seeds {', '.join(map(str, sorted(s)))}" for name, s in seeds.items()), ""]


def findings_block(path: Path) -> list[str]:
    """The hand-written analysis between the findings markers of an existing BENCHMARKS.md (kept on rebuild)."""
    if not path.is_file():
        return []
    text = path.read_text()
    if FINDINGS_START not in text or FINDINGS_END not in text:
        return []
    return [FINDINGS_START + text.split(FINDINGS_START, 1)[1].split(FINDINGS_END, 1)[0] + FINDINGS_END, ""]


def build(conv_paths, docs: Path, plots: bool = True, out: Path | None = None) -> str:
    """BENCHMARKS.md: the kept findings block, then each JSON's sections (the first one's step-speed table)."""
    conv_paths = [conv_paths] if isinstance(conv_paths, Path) else list(conv_paths)
    variant = variant_of(conv_paths[0])
    speed = docs / f"step_speed{variant}.md"
    out = out or docs / f"BENCHMARKS{variant}.md"
    lines = ["# Benchmarks", "",
             "Generated by `python benchmarks/report.py` from " + ", ".join(f"`{p.name}`" for p in conv_paths)
             + (f" and `{speed.name}`" if speed.is_file() else "") +
             ". Every number below comes from those files; only the findings section between the "
             "`findings` markers is written by hand (and kept when the file is regenerated).", ""]
    lines += findings_block(out)
    for i, path in enumerate(conv_paths):
        lines += run_sections(path, docs, plots, with_speed=i == 0)
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--convergence", type=Path, nargs="+", default=None,
                        help="one or more convergence JSONs (default: those of DEFAULT_JSONS present in docs/, "
                             "-> docs/BENCHMARKS.md); otherwise the outputs are named after the first")
    parser.add_argument("--docs", type=Path, default=ROOT / "docs", help="where BENCHMARKS*.md and the PNGs go")
    parser.add_argument("--no-plots", action="store_true")
    args = parser.parse_args(argv)
    args.docs.mkdir(parents=True, exist_ok=True)
    paths = args.convergence or [ROOT / "docs" / name for name in DEFAULT_JSONS if (ROOT / "docs" / name).is_file()]
    # the default set is the main document; another JSON's outputs are named after it (convergence_cuda.json ->
    # BENCHMARKS_cuda.md)
    out = args.docs / ("BENCHMARKS.md" if args.convergence is None else f"BENCHMARKS{variant_of(paths[0])}.md")
    text = build(paths, args.docs, plots=not args.no_plots, out=out)
    atomic_write(out, lambda tmp: Path(tmp).write_text(text + "\n"))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
