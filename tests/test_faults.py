"""Faults (issue 7): non-finite gradients, fp16 grad scaling, a writer killed mid-save, a run killed mid-way.

Claims tested
- Every Hina optimizer: a NaN/+Inf/-Inf, or a finite 1e20 whose square overflows, in one tensor's gradient
  at step k skips that tensor's update (its
  weights and its state unchanged to the bit), counts it in ``training_stats.skipped_updates``, updates the
  other tensors, and training goes on with finite weights.
- The trainer prints a warning naming the step when the optimizer skipped something, and finishes with
  finite weights. With ``--max_grad_norm`` > 0 (kohya's default 1.0) a non-finite gradient makes the global
  norm non-finite, clipping spreads it to every tensor, and the optimizer skips the whole step (every
  tensor counted); with ``--max_grad_norm 0`` only the affected tensor is skipped.
- fp16 grad scaling: on CPU accelerate gives no GradScaler for ``--mixed_precision fp16`` (its autocast is
  CUDA-only), so the scaler/optimizer interaction is tested directly with ``torch.amp.GradScaler("cpu")``:
  an overflow step is skipped by the scaler (the optimizer is not called: state, step count and skip count
  unchanged) and the scale backs off; every other step equals, to the bit, the same run without a scaler.
- A writer killed (``os._exit``) between writing and renaming, for the LoRA file and at either rename of
  the state folder: the previous file and state folder stay valid and loadable (``--resume`` restores a
  folder left aside by the interrupted rename).
- A run killed (SIGKILL) during step 3 after a ``--save_state`` at step 2, then ``--resume``: the final
  weights equal an uninterrupted run's to the bit (same machine, same thread count, fixed seed, CPU).
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from _hina_cases import CLASSES, IDS, bits, dtype_of, lora_params, make, same_state, set_grads, skipped, state_bits

DEMO_SAMPLES = False  # the built-in demo trains without sample images here (conftest); none is checked

ROOT = Path(__file__).resolve().parents[1]
# "huge": finite, but its square overflows float32 (g^2 = 1e40): skipped like a non-finite one, not turned into NaN
BAD = {"nan": float("nan"), "inf": float("inf"), "-inf": float("-inf"), "huge": 1e20}


# --- optimizer level -------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", list(BAD))
@pytest.mark.parametrize("cls", CLASSES, ids=IDS)
def test_nonfinite_grad_in_one_tensor_is_skipped_and_counted(cls, bad):
    named = lora_params(cls)
    params = [p for _, p in named]
    opt = make(cls, named)
    k, victim = 3, 1
    for step in range(k):
        set_grads(params, step)
        opt.step()
    assert skipped(opt) == 0
    weights_before = [bits(p) for p in params]
    state_before = state_bits(opt, params[victim])

    set_grads(params, k)
    params[victim].grad.view(-1)[5] = BAD[bad]
    opt.step()

    assert torch.equal(bits(params[victim]), weights_before[victim]), "the skipped tensor moved"
    assert same_state(state_bits(opt, params[victim]), state_before), "the skipped tensor's state changed"
    assert skipped(opt) == 1
    moved = [i for i, p in enumerate(params) if not torch.equal(bits(p), weights_before[i])]
    assert victim not in moved and len(moved) >= len(params) - 2, f"other tensors should update, moved={moved}"

    for step in range(k + 1, k + 6):
        set_grads(params, step)
        opt.step()
    assert skipped(opt) == 1
    assert opt.state[params[victim]]["step"] == k + 5  # every step but the skipped one
    for name, p in named:
        assert torch.isfinite(p.float()).all(), f"{name} is not finite"
    for p in params:
        for key, value in opt.state[p].items():
            if key == "context_loss":  # C-Optim's loss history: NaN marks a slot with no loss yet (by design)
                continue
            if isinstance(value, torch.Tensor) and value.is_floating_point():
                assert torch.isfinite(value.float()).all(), f"state {key} is not finite"


@pytest.mark.parametrize("cls", CLASSES, ids=IDS)
def test_all_gradients_nonfinite_changes_nothing(cls):
    named = lora_params(cls)
    params = [p for _, p in named]
    opt = make(cls, named)
    set_grads(params, 0)
    opt.step()
    before = [bits(p) for p in params]
    states = [state_bits(opt, p) for p in params]
    for p in params:
        p.grad.fill_(float("nan"))
    opt.step()
    moved = [n for (n, p), b in zip(named, before) if not torch.equal(bits(p), b)]
    assert not moved, f"moved with every gradient non-finite: {moved}"
    changed = [n for (n, p), s in zip(named, states) if not same_state(state_bits(opt, p), s)]
    assert not changed, f"state changed with every gradient non-finite: {changed}"
    assert skipped(opt) == len(params)


# --- fp16 grad scaler ---------------------------------------------------------------------------------------
def _scaled_run(cls, overflow_at: int | None, use_scaler: bool, steps: int = 6):
    torch.manual_seed(0)
    named = lora_params(cls)
    params = [p for _, p in named]
    opt = make(cls, named)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10, growth_interval=1000) if use_scaler else None
    scales = []
    for step in range(steps):
        g = torch.Generator().manual_seed(step)
        targets = [torch.randn(p.shape, generator=g) for p in params]
        loss = sum(((p.float() - t) ** 2).mean() for p, t in zip(params, targets))
        for p in params:
            p.grad = None
        if use_scaler:
            scaler.scale(loss).backward()
        else:
            loss.backward()
        if step == overflow_at:
            if not use_scaler:
                continue  # what the scaler does: no optimizer step at all
            params[1].grad.view(-1)[0] = float("inf")
        if use_scaler:
            scaler.step(opt)
            scaler.update()
            scales.append(scaler.get_scale())
        else:
            opt.step()
    return params, opt, scales


@pytest.mark.parametrize("cls", CLASSES, ids=IDS)
def test_grad_scaler_and_optimizer_agree(cls):
    scaled, opt, scales = _scaled_run(cls, overflow_at=2, use_scaler=True)
    plain, ref, _ = _scaled_run(cls, overflow_at=2, use_scaler=False)
    # the scaler skipped step 2 itself (the optimizer never saw the inf) and halved its scale
    assert scales[2] == scales[1] / 2 and scales[1] == 2.0 ** 10
    assert skipped(opt) == 0
    info = opt.get_optimization_info()["training_stats"]
    assert info["global_step"] == ref.get_optimization_info()["training_stats"]["global_step"] == 5
    for a, b in zip(scaled, plain):  # power-of-two scales unscale exactly: same weights to the bit
        assert torch.equal(bits(a), bits(b))
        assert torch.isfinite(a.float()).all()


def test_accelerate_fp16_on_cpu_has_no_grad_scaler():
    """Documents the platform fact the test above works around (docs/DISTRIBUTED.md)."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)  # an earlier test in this process may have made one
    try:
        acc = Accelerator(mixed_precision="fp16", cpu=True)
        assert acc.scaler is None
    finally:  # the state is a process-wide singleton: later trainer runs in this process pick their own
        AcceleratorState._reset_state(reset_partial_state=True)


# --- a writer killed between write and rename -------------------------------------------------------------
WRITER = textwrap.dedent('''
    import os, sys, json
    import torch
    sys.path.insert(0, {root!r})
    from library.hina import HinaAdamW
    from library.hina_train import saving

    class Net(torch.nn.Module):
        def __init__(self, value):
            super().__init__()
            self.lora_down = torch.nn.Parameter(torch.full((4, 8), float(value)))
        def save_weights(self, path, dtype, metadata):
            from safetensors.torch import save_file
            save_file({{k: v.detach().clone() for k, v in self.state_dict().items()}}, path)

    out = sys.argv[1]
    kill = sys.argv[2]           # "file", "rename1" or "rename2"
    def save(value):
        net = Net(value)
        opt = HinaAdamW(net.parameters(), lr=0.0, optim_bits=32)  # a real step that leaves the weights at value
        net.lora_down.grad = torch.ones_like(net.lora_down)
        opt.step()
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
        if kill == "file":
            saving.save_network(net, os.path.join(out, "demo.safetensors"), None, None)
        else:
            saving.save_state(os.path.join(out, "demo-state"), net, opt, sched, torch.Generator(),
                              {{"global_step": value}})

    save(1.0)                    # the previous, complete save
    calls = [0]
    real = os.replace
    target = {{"file": 1, "rename1": 1, "rename2": 2}}[kill]
    def dying_replace(src, dst):
        calls[0] += 1
        if calls[0] == target:
            os._exit(9)          # killed: no cleanup, no finally blocks
        return real(src, dst)
    os.replace = dying_replace
    save(2.0)
    print("not killed")
''')


@pytest.mark.parametrize("kill", ["file", "rename1", "rename2"])
def test_killed_writer_leaves_previous_save_valid(tmp_path, kill):
    script = tmp_path / "writer.py"
    script.write_text(WRITER.format(root=str(ROOT)))
    out = tmp_path / "out"
    out.mkdir()
    done = subprocess.run([sys.executable, str(script), str(out), kill], capture_output=True, text=True, timeout=120)
    assert done.returncode == 9, done.stdout + done.stderr
    if kill == "file":
        weights = load_file(str(out / "demo.safetensors"))
        assert torch.equal(weights["lora_down"], torch.full((4, 8), 1.0))
        return
    from library.hina_train.saving import check_state_files

    state = out / "demo-state"
    if kill == "rename2":  # killed between moving the old folder aside and moving the new one in
        assert not state.exists()
    check_state_files(state)  # what --resume runs first: restores the folder left aside
    assert json.loads((state / "trainer_state.json").read_text())["global_step"] == 1.0
    assert torch.equal(load_file(str(state / "network.safetensors"))["lora_down"], torch.full((4, 8), 1.0))
    torch.load(state / "optimizer.pt", weights_only=False)
    assert not [p for p in out.iterdir() if p.name.startswith(".demo-state.old.")]


# --- a run killed mid-way, then --resume -------------------------------------------------------------------
KILLER = textwrap.dedent('''
    import os, signal, sys
    import torch
    sys.path.insert(0, {root!r})
    torch.set_num_threads({threads})
    from library.hina_train import cli, loop, trainer

    for key in ("sample_prompts", "sample_at_first", "sample_every_n_steps"):  # as DEMO_SAMPLES = False
        trainer.DEMO_SETTINGS.pop(key)
    real_setup = loop.Trainer._setup_models
    def setup(self):
        real_setup(self)
        inner, calls = self.inner_optimizer, [0]
        real_step = inner.step
        def step(*a, **k):
            calls[0] += 1
            if calls[0] == {kill_at}:
                os.kill(os.getpid(), signal.SIGKILL)
            return real_step(*a, **k)
        inner.step = step
    loop.Trainer._setup_models = setup
    sys.exit(cli.main(sys.argv[1:]))
''')
COMMON = ["--resolution", "32", "--max_train_steps", "4", "--train_batch_size", "2", "--lr_scheduler", "cosine",
          "--lr_warmup_steps", "1", "--save_every_n_steps", "2", "--save_state"]


@pytest.mark.slow
def test_killed_run_resumes_to_identical_weights(tmp_path):
    from library.hina_train.cli import run

    killed = tmp_path / "killed"
    script = tmp_path / "killer.py"
    script.write_text(KILLER.format(root=str(ROOT), threads=torch.get_num_threads(), kill_at=3))
    done = subprocess.run([sys.executable, str(script), *COMMON, "--output_dir", str(killed)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == -signal.SIGKILL, done.stderr[-2000:]
    state = killed / "demo-step00000002-state"
    assert state.is_dir() and not (killed / "demo.safetensors").exists()

    resumed = run(COMMON + ["--output_dir", str(killed), "--resume", str(state)])
    full = run(COMMON + ["--output_dir", str(tmp_path / "full")])
    assert resumed["global_step"] == full["global_step"] == 4
    assert resumed["losses"] == full["losses"]
    a, b = load_file(str(killed / "demo.safetensors")), load_file(str(tmp_path / "full" / "demo.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)


# --- the trainer with a non-finite gradient ----------------------------------------------------------------
def _inject_nan(monkeypatch, at_micro_batch: int):
    from library.hina_train import loop

    real_setup = loop.Trainer._setup_models

    def setup(self):
        real_setup(self)
        param = next(p for p in self.accelerator.unwrap_model(self.network).parameters() if p.requires_grad)
        calls = [0]

        def hook(grad):
            calls[0] += 1
            return grad * float("nan") if calls[0] == at_micro_batch else grad

        param.register_hook(hook)

    monkeypatch.setattr(loop.Trainer, "_setup_models", setup)


@pytest.mark.parametrize("clip", ["0", "1.0"])
def test_trainer_logs_skip_and_continues(tmp_path, monkeypatch, capsys, clip):
    from library.hina_train.cli import run

    _inject_nan(monkeypatch, at_micro_batch=2)
    result = run(["--resolution", "32", "--max_train_steps", "3", "--train_batch_size", "2", "--max_grad_norm", clip,
                  "--output_dir", str(tmp_path)])
    out = capsys.readouterr()
    text = out.out + out.err
    stats = result["optimizer_info"]["training_stats"]
    n_params = result["optimizer_info"]["lora_stats"]["lora_a_params"] * 2
    assert stats["global_step"] == 3
    expected = 1 if clip == "0" else n_params  # clipping spreads a non-finite norm to every tensor
    assert stats["skipped_updates"] == expected
    assert f"step 2: the optimizer skipped {expected} tensor update(s) with non-finite gradients" in text
    weights = load_file(str(tmp_path / "demo.safetensors"))
    assert all(torch.isfinite(v.float()).all() for v in weights.values())
    assert all(math.isfinite(x) for x in result["losses"])
