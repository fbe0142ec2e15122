"""--save_state then --resume continues the built-in default exactly as the uninterrupted run.

Claims tested
- On the same machine and thread count, the resumed run's per-step losses and final LoRA weights are
  bit-identical to the uninterrupted run's (rtol=0, atol=0).
- The fp16 GradScaler's state (loss scale, growth tracker) is saved in ``scaler.pt`` and restored on
  ``--resume``, so the resumed run's scale equals the uninterrupted run's. accelerate makes a scaler for fp16
  only off CPU (``Accelerator.__init__``: fp16 and ``device.type != "cpu"``; on CPU its fp16 autocast is off
  too), while ``torch.amp.GradScaler("cpu")`` works: the tests here use one, directly and in the trainer.
- A state folder without ``scaler.pt`` (saved before it existed, or without fp16) still resumes, with a
  fresh scale and a note.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from library.hina_train import saving
from library.hina_train.cli import run

DEMO_SAMPLES = False  # the built-in demo trains without sample images here (conftest); none is checked

STEPS, SAVE_AT = 6, 3


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    full = tmp_path_factory.mktemp("full")
    resumed = tmp_path_factory.mktemp("resumed")
    common = ["--resolution", "32", "--max_train_steps", str(STEPS), "--train_batch_size", "2",
              "--gradient_accumulation_steps", "2", "--lr_scheduler", "cosine", "--lr_warmup_steps", "2"]
    uninterrupted = run(common + ["--output_dir", str(full), "--save_every_n_steps", str(SAVE_AT), "--save_state"])
    state = full / f"demo-step{SAVE_AT:08d}-state"
    continued = run(common + ["--output_dir", str(resumed), "--resume", str(state)])
    return full, resumed, state, uninterrupted, continued


@pytest.mark.slow
def test_state_folder_is_complete(runs):
    _, _, state, _, _ = runs
    for name in ("network.safetensors", "optimizer.pt", "scheduler.pt", "rng.pt", "trainer_state.json"):
        assert (state / name).is_file(), name
    assert json.loads((state / "trainer_state.json").read_text())["global_step"] == SAVE_AT
    assert not [p for p in state.parent.iterdir() if p.name.startswith(".")], "temp folders left behind"


@pytest.mark.slow
def test_resumed_losses_are_bit_identical(runs):
    _, _, _, uninterrupted, continued = runs
    assert continued["global_step"] == STEPS
    assert len(continued["losses"]) == STEPS  # history carried in the state, then continued
    assert continued["losses"] == uninterrupted["losses"]


@pytest.mark.slow
def test_resumed_weights_are_bit_identical(runs):
    full, resumed, _, _, _ = runs
    a = load_file(str(full / "demo.safetensors"))
    b = load_file(str(resumed / "demo.safetensors"))
    assert set(a) == set(b)
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=0)


@pytest.mark.slow
def test_network_weights_that_fit_start_the_next_run(runs, tmp_path):
    full, _, _, _, _ = runs
    result = run(["--max_train_steps", "1", "--output_dir", str(tmp_path), "--network_weights",
                  str(full / "demo.safetensors"), "--learning_rate", "1e-12"])
    a, b = load_file(str(full / "demo.safetensors")), load_file(str(result["output"]))
    assert any(v.abs().max() > 1e-3 for k, v in a.items() if "lora_up" in k)  # trained, not the zero init
    for key in a:  # lr 1e-12: one step moves a weight by about 1e-12, so the loaded weights come out
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=1e-6)


# --- fp16 grad scaler ---------------------------------------------------------------------------------------
def _used_scaler() -> torch.amp.GradScaler:
    """A CPU GradScaler moved off its defaults by real steps: one overflow (scale halved), one good step."""
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10, growth_interval=3)
    w = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.SGD([w], lr=0.1)
    for bad in (True, False):
        scaler.scale((w ** 2).sum()).backward()
        if bad:
            w.grad[0] = float("inf")
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
    assert scaler.get_scale() == 2.0 ** 9 and scaler.state_dict()["_growth_tracker"] == 1
    return scaler


def _state_parts():
    net = torch.nn.Linear(3, 2)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    return net, opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0), torch.Generator().manual_seed(0)


def test_scaler_state_round_trips(tmp_path):
    saved = _used_scaler()
    net, opt, sched, gen = _state_parts()
    saving.save_state(tmp_path / "state", net, opt, sched, gen, {"global_step": 2}, scaler=saved)
    assert (tmp_path / "state" / saving.SCALER_FILE).is_file()
    fresh = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10, growth_interval=3)
    saving.load_state(tmp_path / "state", *_state_parts(), scaler=fresh)
    assert fresh.state_dict() == saved.state_dict()
    # and the loaded scaler goes on as the saved one does: two more good steps reach the growth interval
    for scaler in (saved, fresh):
        w = torch.nn.Parameter(torch.ones(3))
        opt = torch.optim.SGD([w], lr=0.1)
        for _ in range(2):
            scaler.scale((w ** 2).sum()).backward()
            scaler.step(opt)
            scaler.update()
    assert fresh.get_scale() == saved.get_scale() == 2.0 ** 10
    assert fresh.state_dict() == saved.state_dict()


def test_state_without_scaler_file_resumes_with_a_fresh_scale(tmp_path, capsys):
    net, opt, sched, gen = _state_parts()
    saving.save_state(tmp_path / "state", net, opt, sched, gen, {"global_step": 2})  # no scaler: no fp16
    assert not (tmp_path / "state" / saving.SCALER_FILE).exists()
    saving.check_state_files(tmp_path / "state")  # scaler.pt is not required
    fresh = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    saving.load_state(tmp_path / "state", *_state_parts(), scaler=fresh)
    assert fresh.get_scale() == 2.0 ** 10
    out = capsys.readouterr().out
    assert "no scaler.pt" in out and "starts fresh" in out and out.count("\n") == 1


@pytest.mark.slow
def test_resumed_fp16_run_keeps_the_loss_scale(tmp_path, monkeypatch):
    """The trainer with fp16 and accelerate's real scaler path (scale -> backward, unscale before clipping,
    scaler.step/update), on CPU by giving the Accelerator a CPU GradScaler as it would get one on CUDA."""
    import accelerate
    from accelerate.state import AcceleratorState

    scalers = []

    class CpuScalerAccelerator(accelerate.Accelerator):
        def __init__(self, *a, **kw):
            AcceleratorState._reset_state(reset_partial_state=True)  # the state singleton fixes mixed_precision
            super().__init__(*a, **kw)
            self.native_amp = True  # what fp16 off CPU sets: fp16 autocast, unscale before clipping
            # growth every good step: the scale moves each step, and a fresh one differs from the saved one
            self.scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8, growth_interval=1)
            scalers.append(self.scaler)

    monkeypatch.setattr(accelerate, "Accelerator", CpuScalerAccelerator)
    common = ["--resolution", "32", "--max_train_steps", "3", "--train_batch_size", "1", "--mixed_precision", "fp16"]
    try:
        full = run(common + ["--output_dir", str(tmp_path / "full"), "--save_every_n_steps", "2", "--save_state"])
        state = tmp_path / "full" / "demo-step00000002-state"
        saved = torch.load(state / saving.SCALER_FILE, weights_only=False)
        assert saved["scale"] == 2.0 ** 10  # 2^8 grown at steps 1 and 2
        resumed = run(common + ["--output_dir", str(tmp_path / "resumed"), "--resume", str(state)])
    finally:  # later runs in this process make their own state
        AcceleratorState._reset_state(reset_partial_state=True)
    uninterrupted, continued = scalers
    assert continued.state_dict() == uninterrupted.state_dict()
    assert continued.get_scale() == 2.0 ** 11
    assert resumed["losses"] == full["losses"]
