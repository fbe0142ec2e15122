"""The chunked core (base.py): chunk size does not change results, work memory is bounded, step counting.

Chunked == unchunked to the bit (eager, fp32 and 8-bit: a per-tensor reduction adds the same blocks in the
same order whatever chunk holds the tensor); the work pool is sized by the chunk, at most an eighth of the
model and never more than CHUNK_ELEMENTS (counted and measured by RSS); global_step counts steps that had a gradient; a param listed twice steps once.
"""

import copy

import pytest
import torch

from library.hina import (AdamW_HinaAdaptive, AdamWBF16_HinaAdaptive, Automagic_CameAMP, Automagic_CameAMP8bit,
                          Automagic_CameAMP_COptim, Automagic_CameAMP_COptim8bit, HinaAdamW)
from library.hina.base import (CHUNK_ELEMENTS, MIN_CHUNK_ELEMENTS, MIN_SLOTS, chunk_shape,
                               model_chunk_elements, pack_chunks)

from _hina_cases import ACTIVE, dtype_of, lora_params

SHAPES = [(16, 64), (64, 16), (8, 96), (96, 8), (1,), (300,), (4, 3, 3, 3), (32, 4, 1, 1)]
NAMES = ["a.lora_down.weight", "a.lora_up.weight", "b.lora_down.weight", "b.lora_up.weight", "scale",
         "norm.w_norm", "c.lora_down.weight", "c.lora_up.weight"]


def make(seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter((torch.randn(s, generator=g) * 0.1).to(dtype)) for s in SHAPES]


def run(opt, params, steps, seed=1, skip=()):
    for step in range(steps):
        g = torch.Generator().manual_seed(seed * 1000 + step)
        for i, p in enumerate(params):
            grad = torch.randn(p.shape, generator=g).to(p.dtype)
            p.grad = None if (step, i) in skip else grad
        opt.step()


# Optimizers whose math is per tensor (chunk-independent by construction). AdamW_HinaAdaptive's importance is
# relative to the tensors stepped together, and the C-Optim sketch and bf16 random streams follow the chunks.
PER_TENSOR = [(HinaAdamW, dict(optim_bits=32, min_8bit_size=0)), (HinaAdamW, dict(optim_bits=8, min_8bit_size=0)),
              (HinaAdamW, dict(optim_bits=8, use_adopt_stability=True, use_orthogonal_grad=True, min_8bit_size=0)),
              (Automagic_CameAMP, dict(lr=1e-3, warmup_steps=1, use_tam=True, use_grams=True, use_cautious=True)),
              (Automagic_CameAMP8bit, dict(lr=1e-3, warmup_steps=1, block_size=256, min_8bit_size=0))]


@pytest.mark.parametrize("cls,kwargs", PER_TENSOR, ids=lambda v: getattr(v, "__name__", str(v)))
def test_chunked_equals_unchunked_to_the_bit(cls, kwargs):
    results = []
    for chunk in (256, 1 << 20):  # every tensor (nearly) alone vs all in one chunk
        params = make()
        opt = cls(list(zip(NAMES, params)), compile_step=False, **kwargs)
        opt.chunk_elements = chunk
        run(opt, params, 5, skip={(2, 0), (3, 5)})  # with skipped tensors, so steps differ per tensor
        results.append((params, opt))
        assert len(opt._layouts[0].chunks) > (3 if chunk == 256 else 0)
    (pa, oa), (pb, ob) = results
    assert len(oa._layouts[0].chunks) > len(ob._layouts[0].chunks)
    for a, b in zip(pa, pb):
        assert torch.equal(a, b)
        for key, value in oa.state[a].items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(value, ob.state[b][key]), key


def test_chunk_shapes_are_a_small_fixed_set():
    shapes = {chunk_shape(used, count, 256, CHUNK_ELEMENTS) for used in range(256, CHUNK_ELEMENTS + 1, 256 * 97)
              for count in (1, 7, 40, 200)}
    totals = {t for t, _ in shapes}
    assert all(t >= u for u in [256] for t in totals)
    assert len(totals) <= 4 * 13  # 4 sizes per octave
    assert chunk_shape(CHUNK_ELEMENTS - 5000, 90, 256, CHUNK_ELEMENTS) == (CHUNK_ELEMENTS, 128)
    assert chunk_shape(3 * CHUNK_ELEMENTS + 1, 1, 256, CHUNK_ELEMENTS)[0] % (CHUNK_ELEMENTS // 16) == 0
    assert all(s >= MIN_SLOTS and s & (s - 1) == 0 for _, s in shapes)
    # first-fit decreasing keeps chunks full: 1000 LoRA-sized tensors, all chunks but the last >= 95 % full
    sizes = {i: (i % 7 + 1) * 5120 for i in range(1000)}
    bins = pack_chunks(sizes, CHUNK_ELEMENTS)
    fills = sorted(sum(sizes[i] for i in b) for b in bins)
    assert sorted(i for b in bins for i in b) == list(range(1000))
    assert all(f <= CHUNK_ELEMENTS for f in fills) and all(f >= 0.95 * CHUNK_ELEMENTS for f in fills[1:])


@pytest.mark.parametrize("cls", list(ACTIVE), ids=lambda c: c.__name__)
def test_global_step_counts_only_steps_with_a_gradient(cls):
    named = lora_params(cls)
    params = [p for _, p in named]
    opt = cls(named, **ACTIVE[cls])
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    for p in params:
        p.grad = None
    for _ in range(3):
        opt.step()  # nothing to do: e.g. gradient accumulation calling step() between real steps
    assert opt.get_optimization_info()["training_stats"]["global_step"] == 1
    assert all(opt.state[p]["step"] == 1 for p in params)


@pytest.mark.parametrize("cls", list(ACTIVE), ids=lambda c: c.__name__)
def test_param_listed_twice_steps_once(cls):
    named = lora_params(cls)
    params = [p for _, p in named]
    twice = [params[0], *params]
    with pytest.warns(UserWarning, match="duplicate"):  # torch.optim's own warning
        opt = cls(twice, **{k: v for k, v in ACTIVE[cls].items()})
    for _ in range(2):
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()
    assert opt.state[params[0]]["step"] == 2


@pytest.mark.parametrize("cls", list(ACTIVE), ids=lambda c: c.__name__)
@pytest.mark.parametrize("chunks", [(256, 1 << 20), (1 << 20, 256)], ids=["small-to-large", "large-to-small"])
def test_state_dict_loads_across_chunk_sizes(cls, chunks):
    """state_dict stays per parameter: saved with one chunk size, loaded with another, same next steps."""
    named = lora_params(cls)
    params = [p for _, p in named]
    opt = cls(named, **ACTIVE[cls])
    opt.chunk_elements = chunks[0]
    run(opt, params, 3)
    saved = copy.deepcopy(opt.state_dict())
    restored = [torch.nn.Parameter(p.detach().clone()) for p in params]
    opt_b = cls([(n, q) for (n, _), q in zip(named, restored)], **ACTIVE[cls])
    opt_b.chunk_elements = chunks[1]
    opt_b.load_state_dict(saved)
    for o, ps in ((opt, params), (opt_b, restored)):
        g = torch.Generator().manual_seed(77)
        for p in ps:
            p.grad = torch.randn(p.shape, generator=g).to(p.dtype)
        o.step()
    per_tensor = cls in (HinaAdamW, Automagic_CameAMP, Automagic_CameAMP8bit)
    for a, b in zip(params, restored):
        if per_tensor:
            assert torch.equal(a, b)
        else:  # chunk-relative parts (importance, context sketch, random streams): close, not bitwise
            torch.testing.assert_close(a.float(), b.float(), rtol=0, atol=5e-2)


def _status_bytes(field):
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def test_work_memory_is_bounded_by_the_chunk_and_small_beside_the_model():
    """2M vs 20M elements (a whole-model fp32 buffer of the larger is 80 MB): the pool is a few chunk-sized
    buffers, the chunk is at most an eighth of the model (so the pool stays under 1 byte per parameter at
    either size) and at most CHUNK_ELEMENTS; a steady step's resident-set growth stays below one model-sized
    buffer. 32-bit (the faster eager step; the 8-bit step draws the same buffers and its codes are state, not
    work memory)."""
    workspace, growth = {}, {}
    for total in (2_000_000, 20_000_000):
        g = torch.Generator().manual_seed(0)
        rows = total // (2 * 64 * 320)
        shapes = [(64, 320), (320, 64)] * rows
        params = [torch.nn.Parameter(torch.randn(s, generator=g) * 0.01) for s in shapes]
        names = [f"m{i // 2}.lora_{'down' if i % 2 == 0 else 'up'}.weight" for i in range(len(shapes))]
        for p in params:
            p.grad = torch.randn(p.shape, generator=g)
        opt = HinaAdamW(list(zip(names, params)), lr=1e-4, optim_bits=32, compile_step=False)
        opt.step()  # allocates the state and the pool
        assert opt.chunk_size() == model_chunk_elements(sum(p.numel() for p in params))
        if _reset_peak():
            before = _status_bytes("VmRSS")
            opt.step()
            growth[total] = _status_bytes("VmHWM") - before
        workspace[total] = opt.get_optimization_info()["training_stats"]["workspace_bytes"]
        del opt, params
    assert 0 < workspace[2_000_000] < workspace[20_000_000] <= 4 * 4 * CHUNK_ELEMENTS  # at most 4 fp32 buffers
    for total, nbytes in workspace.items():
        assert nbytes <= 1.0 * total, (total, nbytes)
    if growth:
        mib = {k: v / 2 ** 20 for k, v in growth.items()}
        # The resident-set figure is the second, coarser measurement (allocator reuse makes it vary by tens of
        # MiB from run to run on a loaded machine): a steady step of the 20M set grows it by less than one
        # model-sized fp32 buffer (80 MB), which a whole-model work buffer would exceed by itself.
        assert growth[20_000_000] < 80 * 10 ** 6, mib


def test_chunk_size_follows_the_model():
    """An eighth of the model, rounded down to a power of two, within [2^16, 2^20]: SD1.5 LoRA rank 16 (6.8M
    elements) gets 512K-element chunks, SDXL rank 32 (85M) the largest, a small model the smallest; an explicit
    ``chunk_elements`` wins."""
    assert model_chunk_elements(6_782_976) == 1 << 19
    assert model_chunk_elements(8 * CHUNK_ELEMENTS - 1) == CHUNK_ELEMENTS // 2
    assert model_chunk_elements(8 * CHUNK_ELEMENTS) == model_chunk_elements(85_100_000) == CHUNK_ELEMENTS
    assert model_chunk_elements(8 * (1 << 17) - 1) == 1 << 16
    assert model_chunk_elements(8 * (1 << 17)) == 1 << 17
    assert model_chunk_elements(0) == model_chunk_elements(100_000) == MIN_CHUNK_ELEMENTS
    params = [torch.nn.Parameter(torch.zeros(64, 320)) for _ in range(200)]  # 4.1M elements: 512K / 8
    opt = HinaAdamW(params, lr=1e-3, compile_step=False)
    assert opt.chunk_size() == 1 << 18
    opt.chunk_elements = 1 << 16
    assert opt.chunk_size() == 1 << 16


def test_8bit_state_and_work_memory_at_sd15_size_stay_below_fp32_adamw():
    """The memory promise, in what the optimizer itself holds: HinaAdamW 8-bit (defaults) on 6.8M elements
    (SD1.5 LoRA rank 16's size) keeps state + work pool under 2.75 bytes per parameter; fp32 AdamW's state alone
    is 8. (The step's compiled temporaries are chunk-sized too; benchmarks/step_speed.py measures the steady
    peak.)"""
    g = torch.Generator().manual_seed(0)
    shapes = [(16, 320), (320, 16), (16, 640), (640, 16), (16, 1280), (1280, 16)] * 95  # ~6.8M elements
    params = [torch.nn.Parameter(torch.randn(s, generator=g) * 0.01) for s in shapes]
    names = [f"m{i // 2}.lora_{'down' if i % 2 == 0 else 'up'}.weight" for i in range(len(shapes))]
    for p in params:
        p.grad = torch.randn(p.shape, generator=g)
    opt = HinaAdamW(list(zip(names, params)), lr=1e-4, compile_step=False)
    opt.step()
    total = sum(p.numel() for p in params)
    stats = opt.get_optimization_info()["training_stats"]
    assert stats["state_bytes"] / total < 2.1
    assert stats["workspace_bytes"] / total < 0.7, stats  # two fp32 buffers of one 512K-element chunk
