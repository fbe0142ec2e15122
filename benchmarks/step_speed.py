"""Optimizer step speed and memory on real LoRA/LoKr parameter sets.

Parameter sets come from public model configs built on the ``meta`` device (no weights, no download):

- ``sd15``       SD1.5 UNet, the layers kohya's LoRA adapts in its Transformer2DModel blocks (attention
                 q/k/v/out, feed-forward, 1x1 proj_in/proj_out), rank-16 LoRA A/B tensors;
- ``sdxl``       the same for the SDXL UNet, rank 32;
- ``sd15_lokr``  SD1.5 UNet, LoKr factor 8 (LyCORIS shapes, via networks.lokr.plan_lokr), dim 16;
- ``llm7b``      a Llama-7B-class model's attention q/k/v/o, rank-16 LoRA, 8 of its 32 layers.

Each optimizer runs in its own subprocess (so peak memory is its own), on the same parameter set with
fixed random gradients, and reports the median ``step()`` time, the ratio to torch AdamW (fused) measured
in the same run, optimizer state bytes per parameter, and the growth of the process's peak memory over
the steps (CPU: peak RSS; CUDA: max allocated). Read the ratios, not the milliseconds.

    python benchmarks/step_speed.py [--model sd15 sdxl sd15_lokr llm7b | all] [--steps 20] [--device cpu]
                                    [--threads N] [--json FILE] [--markdown FILE] [--plot PNG]
                                    [--only SUBSTR ...] [--repeat N]

On a GPU: ``--device cuda --json docs/step_speed_cuda.json --markdown docs/step_speed_cuda.md --plot
docs/step_speed_cuda.png`` keeps those figures beside the CPU ones (``benchmarks/report.py`` picks up
``step_speed_cuda.md`` for ``convergence_cuda.json``).

On a busy CPU, OpenMP threads that wait for each other distort every figure; ``OMP_NUM_THREADS=1
python benchmarks/step_speed.py --threads 1`` then gives stable single-thread ratios. ``--repeat N`` runs each
optimizer in N fresh processes and reports medians with ranges: on a CPU, whether a process faults its step's
temporaries in on every call is the C allocator's choice per process (see the fresh pages column).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from library.hina_train.saving import atomic_write  # noqa: E402
logging.getLogger("bitsandbytes").setLevel(logging.ERROR)

# diffusers' UNet configs (runwayml/stable-diffusion-v1-5 and stabilityai/sdxl-base-1.0 unet/config.json),
# the fields that decide the adapted layers' shapes.
SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768, attention_head_dim=8,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
)
SDXL_UNET = dict(
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
    transformer_layers_per_block=(1, 2, 10), cross_attention_dim=2048, attention_head_dim=(5, 10, 20),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), use_linear_projection=True,
    addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
)
# Llama-2-7B: hidden 4096, 32 layers; attention projections are 4096 x 4096.
LLM7B = dict(hidden=4096, layers=32, layers_used=8)

ALL_OFF = dict(use_spd=False, use_cautious=False, use_orthogonal_grad=False, use_adopt_stability=False,
               use_grams=False, use_agr=False, use_tam=False, use_alora=False, dynamic_weight_decay=False)
MODELS = ("sd15", "sdxl", "sd15_lokr", "llm7b")
RANKS = {"sd15": 16, "sdxl": 32, "sd15_lokr": 16, "llm7b": 16}


def unet_layers(config: dict) -> list[tuple[str, int, int]]:
    """(kohya module name, in_features, out_features) of the layers kohya's LoRA adapts in a UNet."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(**config)
    layers = []
    for module_name, module in unet.named_modules():
        if module.__class__.__name__ != "Transformer2DModel":
            continue
        for child_name, child in module.named_modules():
            if isinstance(child, torch.nn.Linear):
                in_f, out_f = child.in_features, child.out_features
            elif isinstance(child, torch.nn.Conv2d) and child.kernel_size == (1, 1):
                in_f, out_f = child.in_channels, child.out_channels
            else:
                continue
            layers.append(("lora_unet_" + f"{module_name}.{child_name}".replace(".", "_"), in_f, out_f))
    return layers


def lora_shapes(layers, rank: int) -> list[tuple[str, tuple[int, ...]]]:
    shapes = []
    for key, in_f, out_f in layers:
        shapes.append((f"{key}.lora_down.weight", (rank, in_f)))
        shapes.append((f"{key}.lora_up.weight", (out_f, rank)))
    return shapes


def parameter_shapes(model: str, rank: int) -> list[tuple[str, tuple[int, ...]]]:
    if model == "sd15":
        return lora_shapes(unet_layers(SD15_UNET), rank)
    if model == "sdxl":
        return lora_shapes(unet_layers(SDXL_UNET), rank)
    if model == "sd15_lokr":
        from networks.lokr import plan_lokr

        shapes = []
        for key, in_f, out_f in unet_layers(SD15_UNET):
            for name, shape in plan_lokr((out_f, in_f), rank, factor=8).items():
                shapes.append((f"{key}.{name}", shape))
        return shapes
    if model == "llm7b":
        hidden = LLM7B["hidden"]
        layers = [(f"base_model.model.model.layers.{i}.self_attn.{proj}", hidden, hidden)
                  for i in range(LLM7B["layers_used"]) for proj in ("q_proj", "k_proj", "v_proj", "o_proj")]
        return [(name.replace("lora_down", "lora_A.default").replace("lora_up", "lora_B.default"), shape)
                for name, shape in lora_shapes(layers, rank)]
    raise ValueError(f"unknown model {model!r} (valid: {', '.join(MODELS)})")


def optimizer_factories() -> dict:
    """label -> factory(named_params). Peers are the real libraries; missing ones are reported, not fatal."""
    from library.hina import HinaAdamW

    def plain(named):
        return [p for _, p in named]

    def bnb_adamw8bit(named):
        import bitsandbytes as bnb
        return bnb.optim.AdamW8bit(plain(named), lr=1e-4)

    def came(named):
        from came_pytorch import CAME
        return CAME(plain(named), lr=1e-4)

    def prodigy(named):
        from prodigyopt import Prodigy
        return Prodigy(plain(named), lr=1.0)

    def adopt(named):
        from pytorch_optimizer import ADOPT
        return ADOPT(plain(named), lr=1e-4)

    def hina(name, **kwargs):
        def make(named):
            import library.hina as hina_module
            return getattr(hina_module, name)(named, **kwargs)
        return make

    def on_bf16(make):
        """The optimizer on bfloat16 params and gradients (cast in place, as Module.to does; the paired ratio
        then compares with torch AdamW (fused) on the same bf16 params; the memory baseline predates the cast)."""
        def cast(named):
            for _, p in named:
                grad, p.grad = p.grad, None
                p.data = p.data.bfloat16()
                p.grad = None if grad is None else grad.bfloat16()
            return make(named)
        return cast

    return {
        "torch AdamW (fused)": lambda named: torch.optim.AdamW(plain(named), lr=1e-4, fused=True),
        "torch AdamW (for-loop)": lambda named: torch.optim.AdamW(plain(named), lr=1e-4, foreach=False),
        "torch AdamW (foreach)": lambda named: torch.optim.AdamW(plain(named), lr=1e-4, foreach=True),
        "bnb AdamW8bit": bnb_adamw8bit,
        "came-pytorch CAME": came,
        "prodigyopt Prodigy": prodigy,
        "pytorch-optimizer ADOPT": adopt,
        "HinaAdamW (defaults, 8-bit)": lambda named: HinaAdamW(named, lr=1e-4),
        "HinaAdamW (defaults, 32-bit)": lambda named: HinaAdamW(named, lr=1e-4, optim_bits=32),
        "HinaAdamW (all off, 32-bit)": lambda named: HinaAdamW(named, lr=1e-4, optim_bits=32, **ALL_OFF),
        "HinaAdamW (all off, 8-bit)": lambda named: HinaAdamW(named, lr=1e-4, optim_bits=8, **ALL_OFF),
        "HinaAdamW (defaults, 8-bit, resident weights)": lambda named: HinaAdamW(named, lr=1e-4, resident_weights=True),
        "HinaAdamW (all off, 32-bit, resident weights)": lambda named: HinaAdamW(named, lr=1e-4, optim_bits=32,
                                                                                resident_weights=True, **ALL_OFF),
        "AdamW_HinaAdaptive": hina("AdamW_HinaAdaptive", lr=1e-4),
        "AdamWBF16_HinaAdaptive (bf16 params)": on_bf16(hina("AdamWBF16_HinaAdaptive", lr=1e-4)),
        "Automagic_CameAMP": hina("Automagic_CameAMP"),
        "Automagic_CameAMP8bit": hina("Automagic_CameAMP8bit"),
        "Automagic_CameAMP_COptim": hina("Automagic_CameAMP_COptim"),
        "Automagic_CameAMP_COptim8bit": hina("Automagic_CameAMP_COptim8bit"),
    }


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of every tensor in optimizer.state, each storage counted once (our states are views)."""
    if hasattr(optimizer, "state_nbytes"):
        return optimizer.state_nbytes()
    seen, total = set(), 0
    for state in optimizer.state.values():
        for value in state.values():
            if isinstance(value, torch.Tensor) and value.device.type != "meta":
                storage = value.untyped_storage()
                if storage.data_ptr() not in seen:
                    seen.add(storage.data_ptr())
                    total += storage.nbytes()
    return total


def peak_bytes(device: str) -> int:
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _proc_status_bytes(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024  # kB
    except OSError:
        pass
    return None


def current_bytes(device: str) -> int | None:
    """Memory in use now: CUDA allocated, or the process's resident set (Linux)."""
    if device.startswith("cuda"):
        return torch.cuda.memory_allocated()
    return _proc_status_bytes("VmRSS")


def reset_peak(device: str) -> bool:
    """Restart peak tracking (CUDA allocator stats; Linux: VmHWM via /proc/self/clear_refs). False if impossible."""
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
        return True
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def steady_peak_bytes(device: str) -> int | None:
    return torch.cuda.max_memory_allocated() if device.startswith("cuda") else _proc_status_bytes("VmHWM")


def minor_faults() -> int:
    """The process's minor page faults so far (host memory mapped in fresh, each page zeroed by the OS)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def load_compiler(device: str) -> int | None:
    """Compile and run a one-line function, so that torch.compile's own runtime (dynamo, inductor and their
    Python modules: ~150 MiB of host memory, once per process, whatever the model) is loaded before the
    memory baseline is taken. Returns the bytes that loading it added (CPU: resident set), reported apart."""
    before = current_bytes(device)
    torch.compile(lambda x: x * 2.0 + 1.0, dynamic=False)(torch.ones(64, device=device))
    after = current_bytes(device)
    return None if before is None or after is None else max(0, after - before)


def measure(label: str, model: str, rank: int, steps: int, device: str) -> dict:
    """One optimizer on one parameter set (run in its own process by ``main``)."""
    shapes = parameter_shapes(model, rank)
    generator = torch.Generator().manual_seed(0)
    named = []
    for name, shape in shapes:
        p = torch.nn.Parameter(torch.randn(shape, generator=generator).mul_(0.01).to(device))
        p.grad = torch.randn(shape, generator=generator).to(device)
        named.append((name, p))
    total = sum(p.numel() for _, p in named)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    compiler_bytes = load_compiler(device)
    before = peak_bytes(device)
    in_use_before = current_bytes(device)
    optimizer = optimizer_factories()[label](named)
    start = time.perf_counter()
    optimizer.step()  # state allocation and compiling
    sync()
    first_step_s = time.perf_counter() - start
    for _ in range(2):  # warm-up: ADOPT's first steps
        optimizer.step()
    first_peak = peak_bytes(device)
    held = current_bytes(device)  # what stays in use between steps: state, work pool, loaded kernels
    # steady steps: peak tracking restarts after the warm-up, so one-time costs (compiling) drop out
    steady = reset_peak(device) and in_use_before is not None
    times = []
    faults_before = minor_faults()
    for _ in range(steps):
        sync()
        start = time.perf_counter()
        optimizer.step()
        sync()
        times.append((time.perf_counter() - start) * 1e3)
    fresh_pages = (minor_faults() - faults_before) / steps
    steady_peak = steady_peak_bytes(device) if steady else None
    paired = paired_ratio(optimizer, named, steps, sync) if label != "torch AdamW (fused)" else 1.0
    from library.hina.compiled import compiled_graph_count
    info = optimizer.get_optimization_info()["training_stats"] if hasattr(optimizer, "get_optimization_info") else {}
    state, workspace = state_bytes(optimizer), info.get("workspace_bytes", 0)
    return {"optimizer": label, "median_ms": statistics.median(times), "first_step_s": first_step_s,
            "compiled_graphs": compiled_graph_count(), "paired_ratio_to_fused": paired,
            "workspace_bytes_per_param": workspace / total if "workspace_bytes" in info else None,
            "state_bytes_per_param": state / total,
            "peak_growth_bytes_per_param": max(0, first_peak - before) / total,
            "steady_peak_bytes_per_param": None if steady_peak is None else max(0, steady_peak - in_use_before) / total,
            **memory_split(in_use_before, held, steady_peak, state, workspace, total),
            "fresh_page_mib_per_step": fresh_pages * resource.getpagesize() / 2 ** 20,
            "compiler_runtime_bytes": compiler_bytes}


def memory_split(in_use_before, held, steady_peak, state: int, workspace: int, total: int) -> dict:
    """The steady peak in two parts: what is *held* between steps (in use after the warm-up: state, the work
    pool, and the rest, which on CPU is the compiled kernels and the memory the allocator keeps, an amount
    per process, so in MiB), and the *step transient*: how far the timed steps' peak rose above that (the step's
    own temporaries). Nones where the platform reports no current memory."""
    if in_use_before is None or held is None:
        return {"held_bytes_per_param": None, "step_transient_bytes_per_param": None, "held_other_mib": None}
    held_growth = held - in_use_before
    return {"held_bytes_per_param": held_growth / total,
            "step_transient_bytes_per_param": None if steady_peak is None else max(0, steady_peak - held) / total,
            "held_other_mib": (held_growth - state - workspace) / 2 ** 20}


def paired_ratio(optimizer, named, steps: int, sync) -> float:
    """Step time over torch AdamW (fused)'s, measured in this process with the two stepping alternately
    (after the memory figures are taken): on a shared machine whose load changes from minute to minute
    this ratio is far steadier than the ratio of medians taken minutes apart in separate processes.
    Median of the per-pair ratios."""
    clones = [torch.nn.Parameter(p.detach().clone()) for _, p in named]
    for c, (_, p) in zip(clones, named):
        c.grad = p.grad
    fused = torch.optim.AdamW(clones, lr=1e-4, fused=True)
    fused.step()
    ratios = []
    for _ in range(steps):
        times = []
        for opt in (optimizer, fused):
            sync()
            start = time.perf_counter()
            opt.step()
            sync()
            times.append(time.perf_counter() - start)
        ratios.append(times[0] / times[1])
    return statistics.median(ratios)


def run_isolated(label: str, args) -> dict:
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", label, "--model", args.model_one,
               "--steps", str(args.steps), "--device", args.device, "--rank", str(args.rank_one)]
    if args.threads:
        command += ["--threads", str(args.threads)]
    done = subprocess.run(command, capture_output=True, text=True)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        error = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return {"optimizer": label, "error": error[:300]}
    return json.loads(lines[-1])


SPREAD_FIELDS = ("median_ms", "paired_ratio_to_fused", "steady_peak_bytes_per_param")


def combine_repeats(runs: list[dict]) -> dict:
    """One result from several worker processes of one optimizer (``--repeat``): every numeric figure is the
    median over the runs that finished, and the step time, paired ratio and steady peak also carry their
    ``(min, max)`` (``<field>_range``). On a CPU, whether a process faults its step's temporaries in on every
    call is settled per process by the C allocator, so one process's figures can be far from the next's."""
    done = [r for r in runs if "error" not in r]
    if len(runs) == 1 or not done:
        return runs[-1]
    combined = dict(done[0])
    for key, value in done[0].items():
        values = [r.get(key) for r in done]
        if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            combined[key] = statistics.median(values)
    for key in SPREAD_FIELDS:
        values = [r[key] for r in done if r.get(key) is not None]
        if values:
            combined[f"{key}_range"] = [min(values), max(values)]
    combined["repeats"] = len(done)
    if len(done) < len(runs):
        combined["failed_repeats"] = len(runs) - len(done)
    return combined


def run_model(model: str, args) -> dict:
    args.model_one, args.rank_one = model, args.rank or RANKS[model]
    shapes = parameter_shapes(model, args.rank_one)
    total = sum(math.prod(s) for _, s in shapes)
    print(f"\n{model}: rank {args.rank_one}, {len(shapes)} tensors, {total / 1e6:.2f}M params, device {args.device}, "
          f"torch {torch.__version__}, {args.threads or torch.get_num_threads()} thread(s)", flush=True)
    results = []
    for label in optimizer_factories():
        if args.only and not any(s.lower() in label.lower() for s in args.only):
            continue
        results.append(combine_repeats([run_isolated(label, args) for _ in range(args.repeat)]))
        r = results[-1]
        print(f"  {label:32} " + (r["error"] if "error" in r else
                                  f"{r['median_ms']:9.1f} ms  {r['state_bytes_per_param']:5.2f} B/param state"),
              flush=True)
    fused = next((r["median_ms"] for r in results if r["optimizer"] == "torch AdamW (fused)" and "median_ms" in r),
                 None)
    for r in results:
        if "median_ms" in r and fused:
            r["ratio_to_fused"] = r["median_ms"] / fused
    return {"model": model, "rank": args.rank_one, "tensors": len(shapes), "params": total, "results": results}


def markdown(report: dict, argv: list[str]) -> str:
    lines = [
        "# Optimizer step speed and memory",
        "",
        f"Device {report['device']}, torch {report['torch']}, {report['threads']} CPU thread(s), "
        f"{report['processor'] or report['machine']}; median of {report['steps']} steps after 3 warm-up "
        "steps (the first includes compiling). Each optimizer ran in its own process, one after another"
        + (f", {report['repeats']} times: each figure is the median of those processes, and *x fused, paired* and "
           "*steady peak* show their range in brackets." if report.get("repeats", 1) > 1 else "."),
        *(["", report["note"]] if report.get("note") else []),
        "",
        f"Reproduce: `OMP_NUM_THREADS={report['threads']} .venv/bin/python benchmarks/step_speed.py "
        + " ".join(argv) + "`",
        "",
        "Read the ratios, not the milliseconds. Memory columns, per trained parameter: *state* is the bytes of "
        "`optimizer.state` tensors; *steady peak* is the highest memory in use during the timed steps "
        "(peak tracking restarted after the warm-up) minus the memory in use before the optimizer was "
        "created: state, persistent buffers and the step's scratch (CPU: resident set, so it also holds "
        "whatever compiled kernels stay loaded; CUDA: allocated bytes). Every worker loads torch.compile's "
        "own runtime (compiling a one-line function) before that baseline is taken, so the fixed ~150 MiB "
        "of host memory that dynamo and inductor take once per process, whatever the model, is not counted "
        "as the optimizer's (it is `compiler_runtime_bytes` in the JSON); *first-steps peak* is the growth of "
        "the peak over creation and the 3 warm-up steps, which on CPU includes `torch.compile`'s one-time "
        "code generation for the optimizers that compile their step (the Hina optimizers do for models of "
        "1M+ elements; on a GPU that cost is host memory, not GPU memory). *first step s* is the wall time "
        "of the first `step()` (state allocation and, for the Hina optimizers, `torch.compile`, which inductor's "
        "on-disk cache shortens when the same graphs were compiled before); *compiled graphs* counts the "
        "distinct chunk shapes compiled (base.py pads chunks to a few shapes). *x fused, paired* is the "
        "median ratio of step times with the optimizer and torch AdamW (fused) stepping alternately in the same "
        "process: on a shared, loaded machine it is the figure to read (the other ratio divides medians "
        "taken minutes apart, under whatever load each process met).",
        "",
        "Where the steady peak goes: *work pool* is the optimizer's chunk-sized work buffers "
        "(`workspace_bytes`, bounded by the chunk size, base.py); *step transient* is how far the timed steps' "
        "peak rose above the memory held after the warm-up (the step's own temporaries); *other held MiB* is "
        "what stays in use between steps besides state and work pool: on CPU the compiled kernels and the "
        "memory the allocator keeps after compiling, an amount per process (compare it across the two "
        "parameter sets), not per parameter. So steady peak = state + work pool + other held + step transient.",
        "",
        "*fresh pages MiB/step*: host memory the process mapped in anew per timed step (minor page faults x page "
        "size): memory the allocator gave back to the OS and took again within a step, each page faulted in and "
        "zeroed, which costs CPU time. On CPU it comes from the chunk-sized temporaries of the compiled steps and "
        "eager ops: glibc returns the top of its heap to the OS once more than twice its (adaptive) mmap threshold "
        "is free there, so whether a step pays for it depends on what else sits in the heap, and it differs "
        "between identical runs. Where it is large, the step time includes it.",
    ]
    for block in report["models"]:
        lines += ["", f"## {block['model']} (rank/dim {block['rank']}, {block['tensors']} tensors, "
                      f"{block['params'] / 1e6:.2f}M params)", "",
                  "| optimizer | median ms/step | x torch AdamW fused | x fused, paired | state B/param "
                  "| steady peak B/param | work pool B/param | step transient B/param | other held MiB "
                  "| fresh pages MiB/step | first-steps peak B/param | first step s | compiled graphs |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in block["results"]:
            if "error" in r:
                lines.append(f"| {r['optimizer']} | not run: {r['error']} | | | | | | | | | | | |")
                continue
            ratio = f"{r['ratio_to_fused']:.2f}" if r.get("ratio_to_fused") else "-"
            steady = r.get("steady_peak_bytes_per_param")
            paired = f"{r['paired_ratio_to_fused']:.2f}" if r.get("paired_ratio_to_fused") else "-"
            paired += _range(r.get("paired_ratio_to_fused_range"))
            lines.append(f"| {r['optimizer']} | {r['median_ms']:.1f} | {ratio} | {paired} | {r['state_bytes_per_param']:.2f} "
                         f"| {_figure(steady, 2)}{_range(r.get('steady_peak_bytes_per_param_range'))} "
                         f"| {_figure(r.get('workspace_bytes_per_param'), 2)} "
                         f"| {_figure(r.get('step_transient_bytes_per_param'), 2)} "
                         f"| {_figure(r.get('held_other_mib'), 0)} "
                         f"| {_figure(r.get('fresh_page_mib_per_step'), 1)} "
                         f"| {r['peak_growth_bytes_per_param']:.1f} "
                         f"| {r.get('first_step_s', float('nan')):.1f} | {r.get('compiled_graphs', '-')} |")
    return "\n".join(lines) + "\n"


def _figure(value, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _range(bounds) -> str:
    """`` (min-max)`` of a figure over repeated processes, or nothing for one process."""
    return "" if not bounds else f" ({bounds[0]:.2f}-{bounds[1]:.2f})"


def plot(report: dict, path: Path) -> None:
    """Bar chart per parameter set: step time as a multiple of torch AdamW (fused), and state bytes per param."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    blocks = report["models"]
    fig, axes = plt.subplots(len(blocks), 2, figsize=(12, 0.32 * 16 * len(blocks) + 1), squeeze=False)
    for row, block in zip(axes, blocks):
        done = [r for r in block["results"] if "median_ms" in r]
        names = [r["optimizer"] for r in done]
        colors = ["tab:orange" if n.startswith(("Hina", "AdamW_Hina", "Automagic")) else "tab:gray" for n in names]
        title = f"{block['model']} ({block['params'] / 1e6:.2f}M params)"
        row[0].barh(names, [r.get("paired_ratio_to_fused") or r.get("ratio_to_fused") or 0 for r in done], color=colors)
        row[0].set_xscale("log")
        row[0].set_xlabel("step time, x torch AdamW (fused) stepping alternately; lower is faster")
        row[1].barh(names, [r.get("steady_peak_bytes_per_param") or r["state_bytes_per_param"] for r in done],
                    color=colors)
        row[1].set_xlabel("steady peak memory (state + work), bytes per parameter")
        for ax in row:
            ax.set_title(title)
            ax.invert_yaxis()
            ax.grid(axis="x", alpha=0.3)
        row[1].set_yticklabels([])
    fig.suptitle(f"Optimizer step on {report['device']} (torch {report['torch']}, {report['threads']} thread(s))")
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.4 / fig.get_figheight()))  # room for the suptitle
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=100))
    plt.close(fig)


def _write_atomic(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", nargs="+", default=["sd15"], choices=(*MODELS, "all"))
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rank", type=int, default=None, help="default: 16 (32 for sdxl)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--only", nargs="*", help="substrings of optimizer labels to run")
    parser.add_argument("--json", type=Path, default=None, help="write results here")
    parser.add_argument("--markdown", type=Path, default=None, help="write a markdown report here")
    parser.add_argument("--plot", type=Path, default=None, help="write a bar chart (PNG) here")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (1 gives stable ratios on a busy machine)")
    parser.add_argument("--repeat", type=int, default=1,
                        help="fresh worker processes per optimizer: the tables show their medians, and the range of "
                             "the paired ratio and the steady peak")
    parser.add_argument("--note", default=None, help="a sentence for the markdown report (e.g. the machine's load)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.repeat < 1:
        parser.error(f"--repeat must be at least 1, got {args.repeat}")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.worker:
        model = args.model[0]
        print(json.dumps(measure(args.worker, model, args.rank or RANKS[model], args.steps, args.device)))
        return {}

    models = MODELS if "all" in args.model else tuple(args.model)
    report = {"benchmark": "step_speed", "device": args.device, "steps": args.steps, "torch": torch.__version__,
              "machine": platform.machine(), "processor": platform.processor(),
              "threads": args.threads or torch.get_num_threads(), "note": args.note, "repeats": args.repeat,
              "models": [run_model(m, args) for m in models]}
    if args.json:
        _write_atomic(args.json, json.dumps(report, indent=2))
    if args.markdown:
        text = markdown(report, list(argv if argv is not None else sys.argv[1:]))
        if args.plot:
            text += f"\n![step time and state memory]({os.path.relpath(args.plot, args.markdown.parent)})\n"
        _write_atomic(args.markdown, text)
    if args.plot:
        plot(report, args.plot)
    return report


if __name__ == "__main__":
    main()
