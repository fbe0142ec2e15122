"""Weight residency (``resident_weights=True``, CPU; base.py ``_make_resident``): fp32 params live in their chunk's
flat buffer, so a step updates them in place instead of gathering and copying them back. Same results to the bit
as params that keep their own storage; a param whose ``.data`` is replaced later (``Module.to``, ``--full_bf16``, an
assignment) keeps training; params that share storage, or are views of a larger tensor, are left where they are; a
module whose params are resident saves (safetensors, torch.save) and loads like any other."""

import pytest
import torch
from safetensors.torch import load_file, save_file

from library.hina import Automagic_CameAMP8bit, HinaAdamW

from test_core_chunks import NAMES, SHAPES, make, run


def chunk_buffers(opt):
    return [chunk.weights for layout in opt._layouts.values() for chunk in layout.chunks]


def shares_buffer(p, buffers):
    """``p``'s memory lies in one of the chunk buffers (as a storage of its own: see the save test)."""
    return any(b is not None and b.data_ptr() <= p.data_ptr() < b.data_ptr() + b.numel() * b.element_size()
               for b in buffers)


@pytest.mark.parametrize("cls,kwargs", [(HinaAdamW, dict(optim_bits=8, min_8bit_size=0)),
                                        (HinaAdamW, dict(optim_bits=32, use_spd=True, use_orthogonal_grad=True)),
                                        (Automagic_CameAMP8bit, dict(lr=1e-3, warmup_steps=1, min_8bit_size=0))],
                         ids=["HinaAdamW-8bit", "HinaAdamW-32bit-spd-orthograd", "Automagic_CameAMP8bit"])
def test_resident_weights_step_exactly_like_params_with_their_own_storage(cls, kwargs):
    results = []
    for resident in (True, False):
        params = make()
        pointers = [p.data_ptr() for p in params]
        opt = cls(list(zip(NAMES, params)), compile_step=False, resident_weights=resident, **kwargs)
        opt.chunk_elements = 2048  # several chunks
        run(opt, params, 6, skip={(2, 0), (3, 5)})
        buffers = chunk_buffers(opt)
        assert len(buffers) > 1
        if resident:
            assert all(shares_buffer(p, buffers) for p in params)
            assert "weight" not in {name for name, *_ in opt._work._buffers}  # no gathered copy of the weights
        else:
            assert buffers == [None] * len(buffers)
            assert [p.data_ptr() for p in params] == pointers
        results.append(params)
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_a_param_whose_data_is_replaced_keeps_training():
    """``Module.to``/a ``.data`` assignment replaces a param's storage after the first step: a float32 one is moved
    back into the chunk (with the new values), a bf16 one (kohya's --full_bf16) makes the chunk gather from then on;
    either way the next steps update the params the model holds, as params with their own storage would be."""
    reference, replaced = make(), make()
    opts = [HinaAdamW(list(zip(NAMES, ps)), lr=0.02, compile_step=False, optim_bits=32, resident_weights=resident)
            for ps, resident in ((reference, False), (replaced, True))]
    for opt, ps in zip(opts, (reference, replaced)):
        run(opt, ps, 2)
        ps[0].data = ps[0].data.clone() + 1.0  # a new float32 storage with new values
        run(opt, ps, 2, seed=2)

    for a, b in zip(reference, replaced):
        assert torch.equal(a, b)
    assert shares_buffer(replaced[0], chunk_buffers(opts[1]))
    module = torch.nn.Module()
    for i, p in enumerate(replaced):
        module.register_parameter(f"p{i}", p)
    module.to(torch.bfloat16)
    before = [p.detach().clone() for p in replaced]
    run(opts[1], replaced, 1, seed=3)
    assert all(p.dtype == torch.bfloat16 and not torch.equal(p, b) for p, b in zip(replaced, before))
    assert chunk_buffers(opts[1]) == [None]


def test_params_sharing_storage_or_views_of_a_larger_tensor_stay_where_they_are():
    base = torch.randn(200)
    tied = torch.nn.Parameter(torch.randn(8, 8))
    params = [torch.nn.Parameter(base[:100].view(10, 10)), tied, torch.nn.Parameter(tied.data),
              torch.nn.Parameter(torch.randn(16))]
    opt = HinaAdamW(params, compile_step=False, optim_bits=32, lr=0.1, resident_weights=True)
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()
    assert params[0].data_ptr() == base.data_ptr()  # still a view of ``base``: it saw the update
    assert torch.equal(base[:100].view(10, 10), params[0])
    assert params[1].data_ptr() == params[2].data_ptr()  # still tied
    assert chunk_buffers(opt) == [None]  # their one chunk gathers, as without residency


def test_a_module_with_resident_params_saves_and_loads(tmp_path):
    """Each resident param is a storage of its own, so savers that keep one tensor per storage keep them all:
    accelerate's save_state (kohya's --save_state) dropped all but one param per chunk when they were views of the
    chunk buffer. torch.save writes each param's own bytes, not the chunk's."""
    from accelerate.utils.other import clean_state_dict_for_safetensors

    module = torch.nn.Sequential(torch.nn.Linear(16, 4, bias=False), torch.nn.Linear(4, 16))
    opt = HinaAdamW(module.named_parameters(), compile_step=False, optim_bits=32, resident_weights=True)
    for p in module.parameters():
        p.grad = torch.randn_like(p)
    opt.step()
    assert all(shares_buffer(p, chunk_buffers(opt)) for p in module.parameters())
    state = module.state_dict()
    assert clean_state_dict_for_safetensors(dict(state)).keys() == state.keys()
    assert len({p.untyped_storage().data_ptr() for p in module.parameters()}) == 3
    save_file(state, tmp_path / "lora.safetensors")
    torch.save(state, tmp_path / "lora.pt")
    assert (tmp_path / "lora.pt").stat().st_size < 4 * sum(p.numel() for p in module.parameters()) + 4096
    for loaded in (load_file(tmp_path / "lora.safetensors"), torch.load(tmp_path / "lora.pt")):
        assert loaded.keys() == state.keys() and all(torch.equal(loaded[k], state[k]) for k in state)
    fresh = torch.nn.Sequential(torch.nn.Linear(16, 4, bias=False), torch.nn.Linear(4, 16))
    fresh.load_state_dict(load_file(tmp_path / "lora.safetensors"))
    module.load_state_dict(fresh.state_dict())  # loading into resident params writes into the chunk buffer
    assert all(shares_buffer(p, chunk_buffers(opt)) for p in module.parameters())


def test_without_numpy_the_chunks_gather_and_say_so(monkeypatch):
    def no_numpy(self, *args, **kwargs):
        raise RuntimeError("Numpy is not available")

    params = make()
    pointers = [p.data_ptr() for p in params]
    opt = HinaAdamW(list(zip(NAMES, params)), compile_step=False, optim_bits=32, resident_weights=True)
    monkeypatch.setattr(torch.Tensor, "numpy", no_numpy)
    with pytest.warns(RuntimeWarning, match="resident_weights needs NumPy.*pip install numpy"):
        run(opt, params, 2)
    assert chunk_buffers(opt) == [None] * len(chunk_buffers(opt))
    assert [p.data_ptr() for p in params] == pointers


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_asking_for_residency_where_it_cannot_apply_says_why(dtype):
    """resident_weights on params it does not apply to (kohya's --full_bf16 casts them before the first step) is
    not silently ignored: one warning names the reason; the step runs as without it."""
    params = make(dtype=dtype)
    opt = HinaAdamW(list(zip(NAMES, params)), compile_step=False, optim_bits=32, resident_weights=True)
    with pytest.warns(UserWarning, match=rf"resident_weights: 1 of 1 chunks keep gathering.*{str(dtype)[6:]} param"):
        run(opt, params, 1)
    assert chunk_buffers(opt) == [None]
    tied = torch.nn.Parameter(torch.randn(8, 8))
    opt = HinaAdamW([tied, torch.nn.Parameter(tied.data)], compile_step=False, optim_bits=32, resident_weights=True)
    for p in opt.param_groups[0]["params"]:
        p.grad = torch.ones_like(p)
    with pytest.warns(UserWarning, match="share storage"):
        opt.step()
