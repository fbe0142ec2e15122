"""Smoke check of the convergence benchmark: ``benchmarks/convergence.py --quick`` runs and writes valid JSON.

No performance assertions: this only checks that every task, the lr sweep, the seeds, the ablation and the
report generator run end to end and produce well-formed output. A subset of optimizers keeps it short while
covering every code path (peer optimizer, 8-bit Hina, bf16 shadow copy, C-Optim loss observation).
"""

import json
import math
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OPTIMIZERS = ["AdamW", "HinaAdamW", "AdamWBF16_HinaAdaptive", "Automagic_CameAMP_COptim8bit"]
TASKS = ["sd_lora", "sd_lokr", "llm_lora"]


def test_convergence_quick_writes_valid_json_and_report(tmp_path):
    out = tmp_path / "convergence_quick.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "convergence.py"), "--quick", "--workers", "1",
           "--cache-dir", str(tmp_path / "cache"), "--out", str(out), "--optimizers", *OPTIMIZERS]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    data = json.loads(out.read_text())
    assert data["meta"]["mode"] == "quick"
    assert set(data["tasks"]) == set(TASKS)
    for task, block in data["tasks"].items():
        assert set(block["results"]) == set(OPTIMIZERS)
        for name, res in block["results"].items():
            assert len(res["final"]) == data["meta"]["seeds"]
            assert res["eval_steps"][0] == 0 and res["eval_steps"][-1] == data["meta"]["steps"]
            assert len(res["mean_curve"]) == len(res["eval_steps"]) == len(res["std_curve"])
            assert res["state_bytes_per_param"] > 0 and res["step_ms"] > 0
            assert res["mean"] is None or math.isfinite(res["mean"])
        if task in ("sd_lora", "llm_lora"):
            assert "full (recipe)" in block["ablation"] and "all off" in block["ablation"]

    docs = tmp_path / "docs"
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "report.py"), "--convergence", str(out),
                           "--docs", str(docs)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    text = (docs / "BENCHMARKS_quick.md").read_text()  # named after the JSON: a quick run keeps its own files
    assert "HinaAdamW" in text and "## Ablation" in text
    assert (docs / "convergence_quick_sd_lora.png").stat().st_size > 0
    assert (docs / "ablation_quick_sd_lora.png").stat().st_size > 0


def test_step_speed_writes_json_table_and_chart(tmp_path):
    """``benchmarks/step_speed.py`` on the smallest parameter set, three optimizers, two steps: well-formed output."""
    json_out, md_out, png_out = tmp_path / "s.json", tmp_path / "s.md", tmp_path / "s.png"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "step_speed.py"), "--model", "sd15_lokr", "--steps", "2",
           "--threads", "1", "--only", "AdamW (fused)", "bnb AdamW8bit", "HinaAdamW (all off, 32-bit)",
           "--json", str(json_out), "--markdown", str(md_out), "--plot", str(png_out)]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    report = json.loads(json_out.read_text())
    (block,) = report["models"]
    assert [r["optimizer"] for r in block["results"]] == [
        "torch AdamW (fused)", "bnb AdamW8bit", "HinaAdamW (all off, 32-bit)"]
    for r in block["results"]:
        assert "error" not in r, r
        assert r["median_ms"] > 0 and r["ratio_to_fused"] > 0 and r["state_bytes_per_param"] > 0
        assert r["steady_peak_bytes_per_param"] is None or r["steady_peak_bytes_per_param"] >= 0
    assert block["results"][0]["ratio_to_fused"] == 1.0
    assert "| HinaAdamW (all off, 32-bit) |" in md_out.read_text()
    assert png_out.stat().st_size > 0
