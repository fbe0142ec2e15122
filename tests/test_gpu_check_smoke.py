"""benchmarks/gpu_check.sh in plumbing mode: the one-shot GPU check's control flow, on any machine, in seconds.

Plumbing mode (always on without CUDA) runs no CUDA step: it checks each step's command line (the script
accepts every flag and value given) and writes the summary; a failing step makes the exit status 1. The
CUDA-machine branch (steps run under time limits, failures and timeouts reported, a failed preflight stops
the run) is exercised with a stand-in python that claims a GPU and runs nothing.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "benchmarks" / "gpu_check.sh"
STEPS = ["preflight", "pytest", "step_speed", "convergence", "demo_fp16"]


def gpu_check(tmp_path: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    environment = {**os.environ, "PYTHON": sys.executable, "GPU_CHECK_OUT": str(tmp_path / "out"),
                   "GPU_CHECK_LOGS": str(tmp_path / "logs"), "OMP_NUM_THREADS": "1", **env}
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=REPO, env=environment, capture_output=True,
                          text=True, timeout=300)


def test_plumbing_mode_checks_every_step_and_writes_the_summary(tmp_path):
    """Without CUDA the plain run is the plumbing check, and says that the CUDA parts are skipped."""
    import torch

    cuda = torch.cuda.is_available()  # on a GPU machine the plain run would be the real check: ask for plumbing
    proc = gpu_check(tmp_path, *(["--plumbing"] if cuda else []))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    first_line = proc.stdout.splitlines()[0]
    assert first_line.startswith("device:")
    if not cuda:
        assert "no CUDA device" in first_line and "the CUDA parts are skipped" in first_line
    assert "no CUDA step ran" in proc.stdout
    summary = (tmp_path / "out" / "gpu_check_plumbing.md").read_text()
    for step in STEPS:
        assert f"| {step} | command line ok (not run: no CUDA) |" in summary, summary
    assert "--device cuda --model sd15 sdxl" in summary and "--mixed_precision fp16" in summary
    assert not (tmp_path / "out" / "gpu_check_cuda.md").exists()
    assert not list((tmp_path / "out").glob(".*")), "temporary summary left behind"
    collected = (tmp_path / "logs" / "pytest.log").read_text()
    assert "cuda tests of the device matrix collected" in collected and not collected.startswith("0 "), collected


def test_a_rejected_command_line_fails_the_check(tmp_path):
    proc = gpu_check(tmp_path, "--plumbing", GPU_CHECK_STEPS="step_speed", GPU_CHECK_SPEED_STEPS="ten")
    assert proc.returncode == 1, proc.stdout[-3000:]
    assert "step_speed: FAILED: command line" in proc.stdout and "invalid int value: 'ten'" in proc.stdout
    summary = (tmp_path / "out" / "gpu_check_plumbing.md").read_text()
    assert "| step_speed | FAILED: command line |" in summary and "| pytest |" not in summary


def test_bad_arguments_are_clear_errors(tmp_path):
    proc = gpu_check(tmp_path, "--fast")
    assert proc.returncode == 2 and "unknown argument '--fast'; valid: --plumbing" in proc.stderr
    proc = gpu_check(tmp_path, "--plumbing", GPU_CHECK_STEPS="speed")
    assert proc.returncode == 2 and "GPU_CHECK_STEPS names 'speed'; valid: preflight pytest" in proc.stderr


FAKE_PYTHON = """#!/usr/bin/env bash
# stands in for a CUDA machine's python: answers the device probe with a GPU, runs nothing else
if [[ "$1" == -c && "$2" == *get_device_name* ]]; then echo "2.0 CUDA 13.0"; echo "Fake GPU"; exit 0; fi
echo "fake python: $*"
[[ " $* " == *" ${FAKE_SLOW:-@} "* ]] && sleep 5
[[ " $* " == *" ${FAKE_FAIL:-@} "* ]] && exit 3
exit 0
"""


def test_full_mode_runs_every_step_and_reports_failures_and_timeouts(tmp_path):
    """The CUDA-machine branch, with a stand-in python: results, exit status, summary in docs' place."""
    fake = tmp_path / "python"
    fake.write_text(FAKE_PYTHON)
    fake.chmod(0o755)
    proc = gpu_check(tmp_path, PYTHON=str(fake))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert proc.stdout.startswith("device: Fake GPU (torch 2.0 CUDA 13.0)")
    summary = (tmp_path / "out" / "gpu_check_cuda.md").read_text()
    for step in STEPS:
        assert f"| {step} | passed |" in summary, summary
    assert "fake python: benchmarks/step_speed.py --device cuda --model sd15 sdxl" in proc.stdout
    assert "all steps passed on Fake GPU" in proc.stdout

    proc = gpu_check(tmp_path, PYTHON=str(fake), FAKE_FAIL="benchmarks/convergence.py",
                     FAKE_SLOW="train_network_hina.py", DEMO_FP16_LIMIT="1")
    assert proc.returncode == 1
    summary = (tmp_path / "out" / "gpu_check_cuda.md").read_text()
    assert "| convergence | FAILED: exit status 3 |" in summary
    assert "| demo_fp16 | FAILED: timed out after 1 s |" in summary
    assert "| step_speed | passed |" in summary and "some steps FAILED" in proc.stdout

    proc = gpu_check(tmp_path, PYTHON=str(fake), FAKE_FAIL="importlib,")
    assert proc.returncode == 1
    summary = (tmp_path / "out" / "gpu_check_cuda.md").read_text()
    assert "| preflight | FAILED: exit status 3 |" in summary
    assert "| pytest | FAILED: not run (preflight failed) |" in summary and "fake python: -m pytest" not in proc.stdout
