"""Merge the rows of one ``benchmarks/convergence.py`` JSON into another, saying so in the target's meta.

A long run is split over sessions (the machine cannot run the whole ``--long`` scope at once), so a later run
of some optimizers or ablation variants replaces their rows in ``docs/convergence_long.json``. Rows are
replaced whole (every seed of a row comes from one run), never averaged across runs; the target's
``meta.merged_from`` records which rows came from which command, date, machine and commit, and runs that
``meta.missing_runs`` listed as not finished are dropped from that list once a merged row covers them.

    python benchmarks/merge_convergence.py --into docs/convergence_long.json --source run.json \\
        --results HinaAdamW Automagic_CameAMP --ablation

``--sweep`` adds a later run's swept lrs (each lr's final losses over the sweep seeds) to the target's sweep
table beside the lrs already there, e.g. the grid neighbours of each optimizer's lr checked at the long horizon;
a swept lr whose mean beats the lr of the optimizer's row is named in the output (the protocol then runs every
seed at it, and that row is merged with ``--results``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from convergence import add_steps_to_adamw_final  # noqa: E402  (run as a script: this folder is on sys.path)
from library.hina_train.saving import atomic_write  # noqa: E402


def merge(target: dict, source: dict, results: list[str], ablation: bool, sweep: bool = False) -> dict:
    """Replace ``results`` rows (and, with ``ablation``, every ablation row) of ``target`` by ``source``'s; with
    ``sweep``, add the source's swept lrs to the target's sweep and lr grid."""
    replaced: dict[str, list[str]] = {}
    for task, block in source["tasks"].items():
        if task not in target["tasks"]:
            raise SystemExit(f"task {task!r} of the source is not in the target (it has {', '.join(target['tasks'])})")
        into = target["tasks"][task]
        for name in results:
            if name not in block["results"]:
                raise SystemExit(f"{name!r} has no row for {task} in the source (it has {', '.join(block['results'])})")
            into["results"][name] = dict(block["results"][name])
            # the lrs tried stay listed (the target's sweep table keeps them): the grid is the union
            into["lr_grid"][name] = sorted(set(into["lr_grid"].get(name, [])) | set(block["lr_grid"][name]))
            replaced.setdefault(task, []).append(name)
        add_steps_to_adamw_final(into["results"])  # against the target's AdamW row: the source may have none
        if ablation:
            for name, row in (block.get("ablation") or {}).items():
                into.setdefault("ablation", {})[name] = row
                replaced.setdefault(task, []).append(f"ablation: {name}")
    if sweep:
        for task, block in source["tasks"].items():
            into = target["tasks"][task]
            for name, values in block["sweep"].items():
                if name not in into["results"]:
                    raise SystemExit(f"{name!r} has no row for {task} in the target, so its sweep has nothing to sit "
                                     f"beside (it has {', '.join(into['results'])})")
                into["sweep"].setdefault(name, {}).update(values)
                into["sweep"][name] = dict(sorted(into["sweep"][name].items(), key=lambda item: float(item[0])))
                into["lr_grid"][name] = sorted(set(into["lr_grid"][name]) | {float(lr) for lr in values})
                replaced.setdefault(task, []).extend(f"sweep: {name} lr {float(lr):g}" for lr in values)
    for block in target["tasks"].values():
        sync_sweep_with_rows(block, target["meta"].get("sweep_seeds", 2))
    meta, smeta = target["meta"], source["meta"]
    meta.setdefault("merged_from", []).append(
        {"command": smeta["command"], "date": smeta["date"], "machine": smeta["machine"], "rows": replaced})
    covered = {(task, row.removeprefix("ablation: ")) for task, rows in replaced.items() for row in rows
               if not row.startswith("sweep: ")}
    if meta.get("missing_runs"):
        meta["missing_runs"] = [m for m in meta["missing_runs"]
                                if (m["task"], m["variant"] or m["optimizer"]) not in covered] or None
    return target


def sync_sweep_with_rows(block: dict, sweep_seeds: int) -> None:
    """The sweep value at a row's lr is the row's first ``sweep_seeds`` seeds (the protocol runs the sweep seeds
    first and reuses them), so a replaced row replaces that sweep entry too."""
    for name, row in block["results"].items():
        entry = block.get("sweep", {}).get(name, {})
        if str(row["lr"]) in entry and row.get("seeds", [])[:sweep_seeds] == list(range(sweep_seeds)):
            entry[str(row["lr"])] = row["final"][:sweep_seeds]


def sweep_winners(conv: dict) -> list[str]:
    """Swept lrs whose mean final loss beats the mean, over the same seeds, at the lr of the optimizer's row."""
    found = []
    for task, block in conv["tasks"].items():
        for name, sweep in block.get("sweep", {}).items():
            row = block["results"].get(name)
            at_row = sweep.get(str(row["lr"])) if row else None
            if not at_row or None in at_row:
                continue
            for lr, values in sweep.items():
                if None not in values and len(values) == len(at_row) and sum(values) < sum(at_row):
                    found.append(f"{task} {name}: lr {float(lr):g} ({sum(values) / len(values):.5f}) beats the row's "
                                 f"lr {row['lr']:g} ({sum(at_row) / len(at_row):.5f}) over the sweep seeds")
    return found


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--into", type=Path, required=True, help="the JSON whose rows are replaced (rewritten)")
    parser.add_argument("--source", type=Path, required=True, help="the JSON of the later run")
    parser.add_argument("--results", nargs="*", default=[], help="optimizer rows to take from the source")
    parser.add_argument("--ablation", action="store_true", help="take every ablation row of the source too")
    parser.add_argument("--sweep", action="store_true",
                        help="add the source's swept lrs to the target's sweep (beside the lrs there)")
    args = parser.parse_args(argv)
    if not args.results and not args.ablation and not args.sweep:
        parser.error("nothing to merge: give --results NAME..., --ablation and/or --sweep")
    target = json.loads(args.into.read_text())
    source = json.loads(args.source.read_text())
    merged = merge(target, source, args.results, args.ablation, args.sweep)
    merged["meta"]["merged_from"][-1]["merge_command"] = "python benchmarks/merge_convergence.py " + " ".join(
        sys.argv[1:] if argv is None else argv)
    text = json.dumps(merged, indent=1) + "\n"
    atomic_write(args.into, lambda temporary: Path(temporary).write_text(text))
    print(f"merged into {args.into}: {merged['meta']['merged_from'][-1]['rows']}")
    for line in sweep_winners(merged):
        print(f"note: {line}")


if __name__ == "__main__":
    main()
