"""benchmarks/sd_scripts_check.py: sd-scripts' real train_network.py with our optimizers and networks.

The runs need an sd-scripts checkout (``SD_SCRIPTS_PATH``) and build their own venv (``--venv``, default
/work/sdvenv; ``SD_SCRIPTS_VENV`` overrides it); without the checkout those tests skip. ``SD_SCRIPTS_CHECK_CASES``
picks the cases (default: a stock run, the hook with LoRA+, and the hook with LoKr); ``make sd-scripts-check``
runs them all.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from library.hina import registry

REPO = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("sd_scripts_check", REPO / "benchmarks" / "sd_scripts_check.py")
check = importlib.util.module_from_spec(spec)
spec.loader.exec_module(check)

SD_SCRIPTS = os.environ.get("SD_SCRIPTS_PATH")
needs_checkout = pytest.mark.skipif(not SD_SCRIPTS, reason="set SD_SCRIPTS_PATH to an sd-scripts checkout")
DEFAULT_CASES = "stock-dotted-lora,hook-loraplus-lora,hook-lokr"


def test_cases_cover_what_the_issue_lists():
    routes = {route for route, _ in check.CASES.values()}
    assert routes == {"stock", "hook", "delegate", "delegate-config"}
    hina = [s.name for s in registry.OPTIMIZERS if s.source == "hina"]
    optimizers = {args[args.index("--optimizer_type") + 1].rsplit(".", 1)[-1]
                  for _, args in check.CASES.values() if "--optimizer_type" in args}
    assert set(hina) <= optimizers  # every Hina optimizer runs at least once
    networks = {args[args.index("--network_module") + 1] for _, args in check.CASES.values()
                if "--network_module" in args}  # delegate-config takes it from its --config_file
    assert networks == {"networks.lora", "networks.lokr", "lycoris.kohya"}
    bf16 = check.CASES["hook-AdamWBF16_HinaAdaptive"][1]
    assert "--full_bf16" in bf16 and bf16[bf16.index("--mixed_precision") + 1] == "bf16"


def test_prepare_checkout_patches_widths_and_drops_our_files_in(tmp_path):
    source = tmp_path / "sd-scripts"
    (source / "library").mkdir(parents=True)
    (source / "networks").mkdir()
    (source / "train_network.py").write_text("")
    unet = "\n".join(old for old, _ in check.PATCHED_UNET_CONSTANTS) + "\n"
    (source / "library" / "original_unet.py").write_text(unet)
    copy = check.prepare_checkout(source, tmp_path / "work" / "sd-scripts")
    text = (copy / "library" / "original_unet.py").read_text()
    assert all(new in text for _, new in check.PATCHED_UNET_CONSTANTS)
    assert (source / "library" / "original_unet.py").read_text() == unet  # the user's checkout is untouched
    assert (copy / "library" / "hina" / "kohya.py").is_file() and (copy / "networks" / "lokr.py").is_file()
    (source / "library" / "original_unet.py").write_text("BLOCK_OUT_CHANNELS = (1, 2)\n")
    with pytest.raises(SystemExit, match="expected one line"):
        check.prepare_checkout(source, tmp_path / "work" / "sd-scripts")


def test_row_shows_loss_pairs_and_lr_per_role():
    row = check.format_row({"case": "hook-lora", "exit": 0, "losses": [1.2, 0.9], "optimizer": "x.HinaAdamW",
                            "pair_groups": {"lora_pairs": 3, "lokr_pairs": 0},
                            "optimizer_info": {"lora_pairs": 3, "lokr_pairs": 0}, "name_sources": ["param_names"],
                            "effective_lr": {"lora_a": [0.001], "lora_b": [0.016]}})
    assert row == ("| hook-lora | 0 | 1.2000 -> 0.9000 | HinaAdamW | LoRA 3 / LoKr 0 (optimizer's own count: "
                   "LoRA 3 / LoKr 0) | param_names | lora_a 0.001, lora_b 0.016 |")


@needs_checkout
def test_sd_scripts_builtin_names_are_branches_of_the_real_get_optimizer():
    # the hook hands these names to sd-scripts; each must be one of its get_optimizer branches
    source = (Path(SD_SCRIPTS) / "library" / "train_util.py").read_text(encoding="utf-8")
    body = source[source.index("def get_optimizer("):source.index("\ndef ", source.index("def get_optimizer(") + 1)]
    branches = {m.lower() for m in re.findall(r'optimizer_type == "(\w+)"\.lower\(\)', body)}
    branches |= {"dadaptation"}  # tested together with DAdaptAdamPreprint in one condition
    handed_over = {n.lower() for spec in registry.OPTIMIZERS for n in spec.sd_scripts_builtin}
    assert handed_over <= branches, sorted(handed_over - branches)


@needs_checkout
def test_real_sd_scripts_runs(tmp_path):
    cases = os.environ.get("SD_SCRIPTS_CHECK_CASES", DEFAULT_CASES)
    work = Path(os.environ.get("SD_SCRIPTS_WORK", tmp_path / "work"))
    report = tmp_path / "runs.json"
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "sd_scripts_check.py"), "--cases", cases,
                           "--work", str(work), "--json", str(report), "--steps", "3"],
                          capture_output=True, text=True, timeout=3600)
    print(proc.stdout[-6000:])
    runs = {r["case"]: r for r in json.loads(report.read_text())["runs"]}
    assert all(r["exit"] == 0 for r in runs.values()), {n: r.get("error") for n, r in runs.items() if r["exit"]}
    for run in runs.values():
        assert len(run["losses"]) == 3 and run["saved"]
    if "hook-loraplus-lora" in runs:  # kohya's 16x is the only B-side ratio (it was 16 x 16 = 256x)
        lrs = runs["hook-loraplus-lora"]["effective_lr"]
        assert lrs["lora_a"] == [1e-3] and lrs["lora_b"] == [pytest.approx(1.6e-2)]
        assert runs["hook-loraplus-lora"]["pair_groups"]["lora_pairs_across_groups"] > 0
    if "hook-lokr" in runs:
        assert runs["hook-lokr"]["pair_groups"]["lokr_pairs"] > 0
        assert runs["hook-lokr"]["name_sources"] == ["param_names"]
