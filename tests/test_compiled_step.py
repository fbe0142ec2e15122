"""The torch.compile'd step computes what the eager step computes."""

import logging

import pytest
import torch

from library.hina import HinaAdamW
from library.hina import hina_adamw

NAMES = ["m.lora_down.weight", "m.lora_up.weight", "n.lora_down.weight", "n.lora_up.weight", "other.weight"]
SHAPES = [(16, 320), (320, 16), (8, 640), (640, 8), (64, 64)]


def run(compile_step, bits, steps=4):
    g = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, generator=g) * 0.1) for s in SHAPES]
    opt = HinaAdamW(list(zip(NAMES, params)), lr=1e-2, compile_step=compile_step, optim_bits=bits)
    for step in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=g)
        opt.step()
    return params, opt


@pytest.mark.slow
@pytest.mark.parametrize("bits", [8, 32])
def test_compiled_step_matches_eager(bits):
    """HinaAdamW's fused chunk step (decode, recipe, apply, encode) compiled and eager agree."""
    before = hina_adamw._fused.compiled_calls
    compiled, opt = run(True, bits)
    if hina_adamw._fused.failed:
        pytest.skip(f"torch.compile is not usable here: {hina_adamw._fused.failed[:200]}")
    assert hina_adamw._fused.compiled_calls > before
    eager, opt_eager = run(False, bits)
    for a, b in zip(compiled, eager):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    if bits == 8:  # codes may differ where a value sits on a rounding boundary: almost nowhere
        for p, q in zip(compiled, eager):
            codes = opt.state[p]["exp_avg"], opt_eager.state[q]["exp_avg"]
            assert (codes[0] != codes[1]).float().mean() < 1e-3


def test_compile_step_is_validated():
    with pytest.raises(ValueError, match="compile_step"):
        HinaAdamW([torch.nn.Parameter(torch.zeros(2))], compile_step="yes")


@pytest.mark.slow
def test_versions_beyond_the_recompile_limit_run_eagerly_and_say_so():
    """Past torch's per-function limit of compiled versions, new pack sizes step eagerly, counted and warned once."""
    import warnings

    import torch._dynamo

    from library.hina.compiled import MaybeCompiled
    # torch's config.patch restores the setting on exit; monkeypatch.setattr on dynamo's config module left
    # ``recompile_limit`` hidden for every later torch.compile in the session (torch 2.13).
    with torch._dynamo.config.patch(recompile_limit=1):

        def axpy(x, y, a: float):
            return x * a + y

        f = MaybeCompiled(axpy)
        small, large = torch.ones(4), torch.ones(8)
        assert torch.equal(f(True, small, small, 2.0), torch.full((4,), 3.0))
        if f.failed:
            pytest.skip(f"torch.compile is not usable here: {f.failed[:200]}")
        assert (f.compiled_calls, f.eager_calls) == (1, 0)
        with pytest.warns(RuntimeWarning, match="keeps 1 versions of the optimizer step"):
            assert torch.equal(f(True, large, large, 2.0), torch.full((8,), 3.0))
        assert (f.compiled_calls, f.eager_calls) == (1, 1)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # said once
            f(True, large, large, 2.0)
            f(True, small, small, 2.0)  # the compiled version still serves its own size
        assert (f.compiled_calls, f.eager_calls) == (2, 2)


@pytest.mark.slow
def test_garbage_of_each_compile_is_collected_once(monkeypatch):
    """After a call that compiled a new version, the compile's cyclic garbage is collected (once per version,
    never on a call that reuses one): left to Python's generational collector it stayed in the steady memory."""
    from library.hina import compiled

    collections = []
    monkeypatch.setattr(compiled, "collect_garbage", lambda: collections.append(1))

    def scale(x, a: float):
        return x * a

    f = compiled.MaybeCompiled(scale)
    f(True, torch.ones(4), 2.0)
    if f.failed:
        pytest.skip(f"torch.compile is not usable here: {f.failed[:200]}")
    assert len(collections) == 1
    f(True, torch.ones(4), 2.0)
    f(False, torch.ones(4), 2.0)  # eager: nothing compiled
    assert len(collections) == 1
    f(True, torch.ones(6), 2.0)  # a new shape: a new version
    assert len(collections) == 2


def test_inductor_options_keep_only_keys_this_torch_knows(monkeypatch):
    """The encode-inlining threshold reaches torch.compile where inductor has the setting; an unknown key is dropped
    instead of making every compile fail (and the step run eagerly)."""
    from library.hina import compiled

    assert compiled.inductor_options() == {"realize_opcount_threshold": 400}
    monkeypatch.setitem(compiled.INDUCTOR_OPTIONS, "no_such_inductor_setting", 1)
    assert "no_such_inductor_setting" not in compiled.inductor_options()
    step = compiled.MaybeCompiled(lambda x: x * 2.0 + 1.0)
    out = step(True, torch.ones(8))
    assert torch.equal(out, torch.full((8,), 3.0)) and step.failed is None and step.compiled_calls == 1


def test_a_step_function_adds_its_own_inductor_options(monkeypatch):
    """A function's own options go on top of the shared ones (AdamW_HinaAdaptive's chunk step recomputes its
    many-input intermediates instead of storing them: adaptive.ADAPTIVE_INDUCTOR_OPTIONS), reach torch.compile,
    and are filtered like the shared ones."""
    from library.hina import adaptive, compiled

    assert compiled.inductor_options({"realize_reads_threshold": 64, "no_such_inductor_setting": 1}) == {
        "realize_opcount_threshold": 400, "realize_reads_threshold": 64}
    assert adaptive._fused.options == adaptive.ADAPTIVE_INDUCTOR_OPTIONS == {"realize_reads_threshold": 64}
    seen = []
    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile",
                        lambda fn, **kwargs: seen.append(kwargs["options"]) or real_compile(fn, **kwargs))
    step = compiled.MaybeCompiled(lambda x: x * 2.0 + 1.0, options={"realize_reads_threshold": 64})
    assert torch.equal(step(True, torch.ones(8)), torch.full((8,), 3.0)) and step.compiled_calls == 1
    assert seen == [{"realize_opcount_threshold": 400, "realize_reads_threshold": 64}]


def test_the_first_compile_is_announced_once_and_each_compile_timed(monkeypatch, caplog):
    """A CPU run can sit a minute on its first step while it compiles: the first compile of the process says so
    before it starts (once), and each compiled version logs how long it took (INFO, as kohya shows it)."""
    from library.hina import compiled

    monkeypatch.setattr(compiled, "_announced", False)

    def shift(x, a: float):
        return x + a

    f = compiled.MaybeCompiled(shift)
    with caplog.at_level(logging.INFO, logger="library.hina"):
        f(True, torch.ones(4), 1.0)
        if f.failed:
            pytest.skip(f"torch.compile is not usable here: {f.failed[:200]}")
        f(True, torch.ones(4), 1.0)  # reuses the version: nothing to say
        f(True, torch.ones(6), 1.0)  # a new version
    messages = [r.getMessage() for r in caplog.records if r.name == "library.hina.compiled"]
    assert sum("compiling the optimizer step" in m for m in messages) == 1
    assert messages[0].startswith("library.hina: compiling")
    timed = [m for m in messages if m.startswith("library.hina: compiled the optimizer step's shift")]
    assert len(timed) == 2 and "(version 1 of it)" in timed[0] and "(version 2 of it)" in timed[1]


def test_the_trainer_shows_the_optimizers_notices_above_its_progress_bar(monkeypatch, capsys):
    """train_network_hina.py prints library.hina's INFO records (through tqdm.write) while it runs, and takes its
    handler off after."""
    from library.hina_train import cli

    seen = []

    def fake_run(argv):
        logging.getLogger("library.hina.compiled").info("library.hina: a notice")
        seen.append(list(logging.getLogger("library.hina").handlers))

    monkeypatch.setattr(cli, "run", fake_run)
    assert cli.main([]) == 0
    assert "library.hina: a notice" in capsys.readouterr().out
    handlers = logging.getLogger("library.hina").handlers
    assert seen[0] and not any(isinstance(h, cli.ProgressBarHandler) for h in handlers)


def chunk_sized_temporaries(opt) -> list[tuple[int, ...]]:
    """Step ``opt`` once, compiling its graphs, and return the shapes of the chunk-sized buffers they allocate per
    call (read from the generated code: inductor's own test helper)."""
    import math
    import re

    from torch._inductor.utils import run_and_get_code

    _, codes = run_and_get_code(opt.step)
    totals = {chunk.total for layout in opt._layouts.values() for chunk in layout.chunks}
    shapes = [tuple(int(n) for n in found.split(",") if n.strip())
              for code in codes for found in re.findall(r"empty_strided_cpu\(\(([0-9, ]+)\)", code)]
    return [shape for shape in shapes if math.prod(shape) in totals]


@pytest.mark.slow
@pytest.mark.parametrize("name, expected",
                         [("Automagic_CameAMP", 0), ("Automagic_CameAMP_COptim", 0), ("HinaAdamW", 2)])
def test_compiled_chunk_steps_allocate_only_the_known_temporaries(name, expected):
    """What each compiled chunk step allocates per call, chunk-sized (a value inductor stores and reads back
    instead of keeping it in registers; glibc may hand such memory back and fault it in again every call): none
    in the Automagic stages (their buffers are passed as (blocks, block) views and U is recomputed, automagic.py;
    session 13's code allocated two here), HinaAdamW 8-bit's new m and v (a block's codes need its absmax first,
    hina_adamw_chunk's docstring). A regression shows as a larger count. (The 8-bit Automagic classes run the
    same stages; compiling theirs from an empty cache took 40-75 s, too long for the suite.)"""
    import library.hina as hina

    g = torch.Generator().manual_seed(0)
    shapes = [(16, 640), (640, 16), (16, 640), (640, 16), (8, 1280), (1280, 8), (320,)]
    names = [f"m{i}.lora_{'down' if i % 2 == 0 else 'up'}.weight" for i in range(len(shapes) - 1)] + ["m.bias"]
    params = [torch.nn.Parameter(torch.randn(s, generator=g) * 0.01) for s in shapes]
    for p in params:
        p.grad = torch.randn(p.shape, generator=g)
    opt = getattr(hina, name)(list(zip(names, params)), lr=1e-3, compile_step=True)
    found = chunk_sized_temporaries(opt)
    if any(f.failed for f in hina.compiled._INSTANCES):
        pytest.skip("torch.compile is not usable here")
    assert len(found) == expected, found
