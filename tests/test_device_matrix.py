"""The same checks on every device: CPU always, CUDA when a GPU is present (marked ``cuda``, skipped without one).

Only the optimizers' public API is used (constructor, ``step``, ``state_dict``/``load_state_dict``,
``get_optimization_info``), so these tests hold across rewrites of the core.

- every Hina optimizer, a few steps on small LoRA-shaped tensors: on CUDA compared with the CPU result
  (tolerances below, stated per kind of state); on CPU two fresh runs must agree to the bit (no hidden
  global state, no unseeded randomness);
- resume: ``state_dict`` round trip on the device, the next steps identical to the bit;
- the 8-bit codec (``library.hina.quant``) against bitsandbytes on the device (CUDA: its CUDA kernels);
- non-finite gradients: the tensor is skipped and counted, the others move;
- bf16 stochastic rounding is unbiased with the device's generator;
- kohya's ``--full_bf16`` order (optimizer built on fp32 params, network cast to bf16 afterwards) steps;
- CUDA only: compiled == eager (optimizer step and codec; the CPU versions are tests/test_compiled_step.py
  and tests/test_quant.py) and trainer smoke runs: fp16 with GradScaler (steps the scaler skipped plus the
  optimizer's steps = all steps), bf16, --full_bf16 with AdamWBF16_HinaAdaptive, gradient checkpointing;
  with two GPUs, a 2-process run whose ranks end identical.
"""

from __future__ import annotations

import copy
import inspect
import math

import pytest
import torch

from _hina_cases import ACTIVE, CLASSES, IDS, bits, dtype_of, lora_params
from library.hina import AdamWBF16_HinaAdaptive, HinaAdamW, quant

DEVICES = [pytest.param("cpu", id="cpu"), pytest.param("cuda", id="cuda", marks=pytest.mark.cuda)]
CUDA_ONLY = [pytest.param("cuda", id="cuda", marks=pytest.mark.cuda)]
STEPS = 3


def settings(cls, **overrides) -> dict:
    """The shared active settings, stepping eagerly where the class can compile (compiling is tested apart)."""
    kwargs = dict(ACTIVE[cls])
    if "compile_step" in inspect.signature(cls).parameters:
        kwargs["compile_step"] = False
    return {**kwargs, **overrides}


def is_8bit(cls) -> bool:
    return cls(lora_params(cls), **settings(cls)).get_optimization_info()["optim_bits"] == 8


def make(cls, device: str, seed: int = 0, **overrides):
    named = lora_params(cls, seed=seed)
    params = [torch.nn.Parameter(p.detach().to(device)) for _, p in named]
    groups = [{"params": params, "named": [n for n, _ in named]}]
    return params, cls(groups, **settings(cls, **overrides))


def set_grads(params, step: int, seed: int = 1) -> None:
    """The same gradients on every device: drawn on the CPU, then moved."""
    g = torch.Generator().manual_seed(seed * 100_003 + step)
    for p in params:
        p.grad = torch.randn(p.shape, generator=g).to(device=p.device, dtype=p.dtype)


def run(opt, params, steps: int, start: int = 0) -> None:
    for step in range(start, start + steps):
        set_grads(params, step)
        opt.step()


def device_tolerance(cls, reference: torch.Tensor) -> torch.Tensor:
    """Largest |CUDA - CPU| allowed per weight after STEPS steps (elementwise, float32).

    fp32 states: 1e-3 of one lr-sized step per step (float32 rounding differs between the devices' kernels;
    a wrong step is of order lr). 8-bit states: 0.1 lr per step (a value on a rounding boundary may take the
    neighbouring code on one device). bf16 weights: also one bf16 ulp of the weight per step, since
    stochastic rounding draws from each device's own generator.
    """
    lr = ACTIVE[cls]["lr"]
    per_step = torch.full(reference.shape, 0.1 * lr if is_8bit(cls) else 1e-3 * lr)
    if reference.dtype == torch.bfloat16:
        magnitude = reference.detach().float().abs().clamp(min=2.0 ** -100)
        per_step += torch.exp2(torch.floor(torch.log2(magnitude)) - 7) * 2  # ulp of the weight and the next binade
    return STEPS * per_step


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("cls", CLASSES, ids=IDS)
def test_steps_agree_with_cpu(cls, device):
    reference, ref_opt = make(cls, "cpu")
    run(ref_opt, reference, STEPS)
    params, opt = make(cls, device)
    run(opt, params, STEPS)
    assert opt.get_optimization_info()["training_stats"]["global_step"] == STEPS
    if device == "cpu":  # a second fresh run: identical to the bit
        for a, b in zip(params, reference):
            assert torch.equal(bits(a), bits(b))
        return
    for a, b in zip(params, reference):
        assert a.device.type == device and a.dtype == b.dtype
        excess = (a.detach().cpu().float() - b.detach().float()).abs() - device_tolerance(cls, b)
        assert (excess <= 0).all(), f"{cls.__name__}: |{device} - cpu| exceeds the tolerance by {excess.max():.3g}"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("cls", CLASSES, ids=IDS)
def test_resume_on_device_is_bit_exact(cls, device):
    params, opt = make(cls, device)
    run(opt, params, 2)
    saved = copy.deepcopy(opt.state_dict())
    resumed_params, resumed = make(cls, device)
    with torch.no_grad():
        for a, b in zip(resumed_params, params):
            a.copy_(b)
    resumed.load_state_dict(saved)
    run(opt, params, 2, start=2)
    run(resumed, resumed_params, 2, start=2)
    for a, b in zip(params, resumed_params):
        assert torch.equal(bits(a), bits(b))
    for a, b in zip(params, resumed_params):
        state, resumed_state = opt.state[a], resumed.state[b]
        assert state.keys() == resumed_state.keys()
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                assert value.device.type == resumed_state[key].device.type
                assert torch.equal(bits(value), bits(resumed_state[key])), key


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("cls", CLASSES, ids=IDS)
def test_non_finite_gradient_is_skipped_and_counted(cls, device):
    params, opt = make(cls, device)
    run(opt, params, 2)
    before = [p.detach().clone() for p in params]
    set_grads(params, 2)
    params[0].grad.view(-1)[3] = float("nan")
    params[2].grad.view(-1)[0] = float("inf")
    opt.step()
    assert torch.equal(bits(params[0]), bits(before[0])) and torch.equal(bits(params[2]), bits(before[2]))
    assert not torch.equal(bits(params[1]), bits(before[1]))
    assert opt.get_optimization_info()["training_stats"]["skipped_updates"] == 2
    assert all(torch.isfinite(p.detach().float()).all() for p in params)
    run(opt, params, 1, start=3)  # and the next ordinary step moves everything again
    assert not torch.equal(bits(params[0]), bits(before[0]))


def _codec_input(signed: bool, device: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(11)
    x = torch.randn(256 * 64, generator=g) * torch.exp(3 * torch.randn(256 * 64, generator=g))
    return (x if signed else x.square()).to(device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("signed", [True, False], ids=["signed", "unsigned"])
def test_codec_against_bitsandbytes_on_device(signed, device):
    bnb_functional = pytest.importorskip("bitsandbytes.functional")
    block = 256
    x = _codec_input(signed, device)
    qmap = quant.dynamic_map(signed, device)
    codes, absmax = quant.encode(x, qmap, block, signed)
    assert codes.device.type == device and codes.dtype == torch.uint8
    ours = quant.decode(codes, absmax, qmap, block)
    bnb_codes, state = bnb_functional.quantize_blockwise(x, code=qmap, blocksize=block)
    theirs = bnb_functional.dequantize_blockwise(bnb_codes, state)
    assert torch.equal(absmax, state.absmax)
    # codes written by bitsandbytes on this device decode here exactly as bitsandbytes decodes them
    assert torch.equal(quant.decode(bnb_codes, state.absmax, qmap, block), theirs)
    our_error, their_error = (ours - x).abs(), (theirs - x).abs()
    zero_point = (x > 0) & (theirs == 0)  # the unsigned map keeps these off zero on purpose (see quant.py)
    assert not ((our_error > their_error * (1 + 1e-6)) & ~zero_point).any()
    assert our_error.mean() <= their_error.mean() * (1 + 1e-6)


@pytest.mark.parametrize("device", DEVICES)
def test_bf16_stochastic_rounding_is_unbiased_on_device(device):
    from library.hina.techniques.stochastic_rounding import stochastic_round

    values = torch.tensor([1.0 + 0.3 * 2 ** -7, -3.0 - 0.71 * 2 ** -6, 1e-3 * 1.37, 250.3])
    x = values.repeat(20000, 1).to(device)
    rounded = stochastic_round(x, 123).cpu()
    assert torch.equal(rounded, rounded.bfloat16().float())  # every result is a bf16 value
    ulp = values.abs() * 2 ** -7
    mean_error = (rounded.double().mean(0) - values.double()).abs()
    assert (mean_error < 0.02 * ulp).all(), mean_error / ulp  # ~7 sigma for 20k draws
    assert ((values.bfloat16().float() - values).abs() > 0.1 * ulp).all()  # nearest rounding would be biased


class _Network(torch.nn.Module):
    def __init__(self, named):
        super().__init__()
        self.weights = torch.nn.ParameterList([p for _, p in named])


@pytest.mark.parametrize("device", DEVICES)
def test_full_bf16_order_of_kohya_steps(device):
    """sd-scripts builds the optimizer on the fp32 network and casts it to bf16 afterwards (--full_bf16)."""
    cls = AdamWBF16_HinaAdaptive
    named = [(n, torch.nn.Parameter(p.detach().float())) for n, p in lora_params(cls)]
    network = _Network(named).to(device)
    params = list(network.weights)
    opt = cls([{"params": params, "named": [n for n, _ in named]}], **settings(cls))
    network.to(torch.bfloat16)  # Module.to keeps the Parameter objects the optimizer holds
    before = [p.detach().clone() for p in params]
    run(opt, params, 2)
    assert all(p.dtype == torch.bfloat16 and p.device.type == device for p in params)
    assert all(not torch.equal(a, p.detach()) for a, p in zip(before, params))
    assert opt.get_optimization_info()["training_stats"]["global_step"] == 2


# --- CUDA only: the CPU versions live in tests/test_compiled_step.py and tests/test_quant.py -------------

@pytest.mark.parametrize("device", CUDA_ONLY)
def test_compiled_step_matches_eager_on_device(device):
    results = []
    for compile_step in (True, False):
        params, opt = make(HinaAdamW, device, compile_step=compile_step)
        run(opt, params, STEPS)
        results.append(params)
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("device", CUDA_ONLY)
@pytest.mark.parametrize("signed", [True, False], ids=["signed", "unsigned"])
def test_compiled_codec_is_bit_identical_on_device(signed, device):
    block = 256
    x = torch.cat([_codec_input(signed, device), torch.zeros(block, device=device)])
    qmap = quant.dynamic_map(signed, device)

    def round_trip(values):
        codes, absmax = quant.encode(values, qmap, block, signed)
        return codes, absmax, quant.decode(codes, absmax, qmap, block)

    for eager, compiled in zip(round_trip(x), torch.compile(round_trip, dynamic=False)(x)):
        assert torch.equal(eager, compiled)


TRAINER_STEPS = 8


@pytest.fixture
def trainer(tmp_path):
    """Runs the standalone trainer in this process (the demo's tiny model and data) on the GPU."""
    from accelerate.state import AcceleratorState

    from library.hina_train.cli import run as run_trainer

    def train(*flags):
        AcceleratorState._reset_state(reset_partial_state=True)
        out = tmp_path / "out"
        return run_trainer(["--output_dir", str(out), "--max_train_steps", str(TRAINER_STEPS), *flags]), out

    yield train
    AcceleratorState._reset_state(reset_partial_state=True)


@pytest.mark.parametrize("device", CUDA_ONLY)
def test_trainer_fp16_grad_scaler_and_optimizer_agree(device, trainer):
    result, out = trainer("--mixed_precision", "fp16", "--save_state")
    assert len(result["losses"]) == TRAINER_STEPS and all(math.isfinite(x) for x in result["losses"])
    scaler = torch.load(out / "demo-state" / "scaler.pt", weights_only=False)
    # GradScaler starts at 2^16 and halves on each step it skips (growth only after 2000 good steps)
    scaler_skips = round(math.log2(65536.0 / scaler["scale"]))
    stats = result["optimizer_info"]["training_stats"]
    assert stats["global_step"] + scaler_skips == TRAINER_STEPS
    assert stats["skipped_updates"] == 0  # the scaler, not the optimizer, saw the overflowing gradients


@pytest.mark.parametrize("device", CUDA_ONLY)
def test_trainer_bf16(device, trainer):
    result, _ = trainer("--mixed_precision", "bf16")
    assert all(math.isfinite(x) for x in result["losses"])
    assert result["optimizer_info"]["training_stats"]["global_step"] == TRAINER_STEPS


@pytest.mark.parametrize("device", CUDA_ONLY)
def test_trainer_full_bf16_with_the_bf16_optimizer(device, trainer):
    result, _ = trainer("--mixed_precision", "bf16", "--full_bf16", "--optimizer_type", "AdamWBF16_HinaAdaptive")
    assert all(math.isfinite(x) for x in result["losses"])
    assert result["optimizer_info"]["optimizer_type"] == "AdamWBF16_HinaAdaptive"
    assert result["optimizer_info"]["training_stats"]["global_step"] == TRAINER_STEPS


@pytest.mark.parametrize("device", CUDA_ONLY)
def test_trainer_gradient_checkpointing_computes_the_same_loss(device, trainer):
    plain, _ = trainer("--seed", "0")
    checkpointed, _ = trainer("--seed", "0", "--gradient_checkpointing")
    assert all(math.isfinite(x) for x in checkpointed["losses"])
    assert checkpointed["losses"][0] == pytest.approx(plain["losses"][0], rel=1e-3)  # same weights, same batch
    assert checkpointed["optimizer_info"]["training_stats"]["global_step"] == TRAINER_STEPS


@pytest.mark.cuda
def test_two_gpus_train_as_one_group_with_identical_ranks(tmp_path):
    """``accelerate launch --multi_gpu`` on two GPUs (NCCL): one group, every rank ends with the same weights
    and optimizer state to the bit (tests/test_distributed.py checks the same on CPU with gloo)."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    if torch.cuda.device_count() < 2:
        pytest.skip(f"needs 2 CUDA GPUs, found {torch.cuda.device_count()}")
    root = Path(__file__).resolve().parents[1]
    probe = tmp_path / "probe"
    env = {**os.environ, "PROBE_DIR": str(probe), "HF_HUB_OFFLINE": "1"}
    env.pop("ACCELERATE_USE_CPU", None)
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", "29541", str(root / "tests" / "_ddp_probe.py"),
               "--max_train_steps", "3", "--train_batch_size", "2", "--output_dir", str(tmp_path / "out")]
    done = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    r0, r1 = (json.loads((probe / f"rank{r}.json").read_text()) for r in (0, 1))
    assert (r0["world_size"], r1["world_size"]) == (2, 2)
    assert r0["network"] and r0["network"] == r1["network"]
    assert r0["optimizer"] == r1["optimizer"]
