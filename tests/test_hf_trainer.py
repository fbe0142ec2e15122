"""LLM recipe: transformers Trainer + peft LoRA with HinaAdamW, parameter names attached."""

import pytest
import torch

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from library.hina import hf  # noqa: E402
from library.hina.base import HinaOptimizer  # noqa: E402


class TextDataset(torch.utils.data.Dataset):
    """A repeating token pattern the model can learn quickly (no download, no tokenizer)."""

    def __init__(self, vocab=64, length=32, count=32):
        torch.manual_seed(0)
        base = torch.arange(length) * 7 % vocab
        self.rows = [torch.roll(base, int(s)) for s in torch.randint(0, length, (count,))]

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, index):
        return {"input_ids": self.rows[index], "labels": self.rows[index]}


def tiny_lora_gpt2():
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=2, n_head=2)
    model = transformers.GPT2LMHeadModel(config)
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True)
    return peft.get_peft_model(model, lora)


class LossLog(transformers.TrainerCallback):
    def __init__(self):
        self.losses = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.losses.append(logs["loss"])


def test_trainer_with_hina_adamw_learns_and_finds_lora_pairs(tmp_path):
    model = tiny_lora_gpt2()
    adapted = sum(isinstance(m, peft.tuners.lora.LoraLayer) for m in model.modules())
    log = LossLog()
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=8, max_steps=24, logging_steps=4,
        report_to=[], save_strategy="no", lr_scheduler_type="constant", use_cpu=True, disable_tqdm=True, seed=0)
    cls_and_kwargs = hf.optimizer_cls_and_kwargs(recipe="llm_lora", lr=1e-2, optim_bits=32)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=TextDataset(),
                                   optimizer_cls_and_kwargs=cls_and_kwargs, callbacks=[log])
    trainer.train()
    optimizer = trainer.optimizer
    optimizer = getattr(optimizer, "optimizer", optimizer)  # accelerate wraps it
    assert isinstance(optimizer, HinaOptimizer)
    info = optimizer.get_optimization_info()
    assert info["lora_stats"]["lora_pairs"] == adapted == 6  # c_attn, attn.c_proj, mlp.c_proj in 2 layers
    assert info["features"]["wd_transition_steps"] == 1200 and info["features"]["use_grams"] is True  # the recipe
    assert optimizer.param_groups[0]["lr"] >= 0
    assert log.losses[-1] < log.losses[0] - 0.1 and log.losses == sorted(log.losses, reverse=True), log.losses


def test_factory_without_trainer_names_peft_roles():
    model = tiny_lora_gpt2()
    factory, kwargs = hf.optimizer_cls_and_kwargs("HinaAdamW", lr=1e-3, alora_ratio=8)
    optimizer = factory()(model, **kwargs)
    groups = optimizer.diagnose_lora_pairing()["groups"]
    assert {g["name_source"] for g in groups} == {"param_names"}
    assert sum(len(g["lora_pairs"]) for g in groups) == 6
    assert optimizer.param_groups[0]["alora_ratio"] == 8


def test_model_argument_gives_a_named_subclass():
    model = tiny_lora_gpt2()
    cls, kwargs = hf.optimizer_cls_and_kwargs("HinaAdamW", model=model, lr=1e-3)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = cls([{"params": params}], **kwargs)
    assert optimizer.get_optimization_info()["lora_stats"]["lora_pairs"] == 6


def test_standard_optimizer_through_the_factory():
    model = tiny_lora_gpt2()
    factory, kwargs = hf.optimizer_cls_and_kwargs("adamw_torch", lr=1e-3)
    optimizer = factory()(model, **kwargs)
    assert type(optimizer) is torch.optim.AdamW and "param_names" not in optimizer.param_groups[0]


# ----------------------------------------------------------------------------------------------------------
# the registry builds what transformers' Trainer(optim=...) builds
from library.hina import registry  # noqa: E402
from transformers.training_args import OptimizerNames  # noqa: E402


class EmbedAndProject(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed = torch.nn.Embedding(300, 64)
        self.q_proj = torch.nn.Linear(64, 64)
        self.norm = torch.nn.LayerNorm(64)
        self.lm_head = torch.nn.Linear(64, 300)

    def forward(self, ids):
        return self.lm_head(self.norm(self.q_proj(self.embed(ids))))


def _bnb_identity(optimizer):
    """bitsandbytes builds one algorithm under several class names: compare what it runs."""
    return (getattr(optimizer, "optimizer_name", None) or type(optimizer).__name__.lower().rstrip("8bit"),
            optimizer.args.optim_bits, bool(getattr(optimizer, "is_paged", False)))


def _build_transformers(optim, model, tmp_path):
    args = transformers.TrainingArguments(output_dir=str(tmp_path), optim=optim, optim_target_modules=["q_proj"],
                                          report_to=[], use_cpu=True)
    cls, kwargs = transformers.Trainer.get_optimizer_cls_and_kwargs(args, model)
    kwargs = dict(kwargs)
    params = kwargs.pop("params", None) or kwargs.pop("model", None) or [p for p in model.parameters()]
    if "optimizer_dict" in kwargs:
        return kwargs["optimizer_dict"]
    return cls(params, **kwargs)


HF_IDS = [n.value for n in OptimizerNames if registry.find_spec(n.value) is not None]


@pytest.mark.parametrize("optim", HF_IDS)
def test_registry_builds_what_trainer_builds(optim, tmp_path):
    spec = registry.find_spec(optim)
    try:
        theirs = _build_transformers(optim, EmbedAndProject(), tmp_path)
    except (ImportError, ValueError, RuntimeError) as error:
        pytest.skip(f"transformers cannot build {optim} here: {str(error)[:80]}")
    model = EmbedAndProject()
    args = {registry.TARGET_MODULES_KEY: ["q_proj"]} if spec.group_keys else None
    params = model if spec.takes_model else [
        {"params": [p for _, p in model.named_parameters()], "param_names": [n for n, _ in model.named_parameters()]}]
    if not spec.group_keys and not spec.takes_model:
        params = [p for p in model.parameters()]
    ours = registry.create_optimizer(optim, params, 5e-5, args)
    if isinstance(theirs, dict):  # layerwise: one inner optimizer per tensor
        ours_inner = [inner for _, inner in ours.inner.values()]
        assert {type(o) for o in theirs.values()} == {type(o) for o in ours_inner}
        theirs, ours = next(iter(theirs.values())), ours_inner[0]
    if type(theirs).__module__.startswith("bitsandbytes"):
        assert _bnb_identity(ours) == _bnb_identity(theirs), optim
    else:
        assert type(ours) is type(theirs), optim
    for key, value in theirs.defaults.items():
        if key in ("lr", "params", "param_names") or key not in ours.defaults:
            continue
        assert ours.defaults[key] == value, f"{optim}: {key}={ours.defaults[key]!r}, transformers {value!r}"


def test_lion_hf_spellings_use_trainers_betas_and_kohya_names_keep_bitsandbytes_defaults():
    params = list(EmbedAndProject().parameters())
    assert registry.create_optimizer("lion_8bit", params, 1e-4).defaults["betas"] == (0.9, 0.999)
    assert registry.create_optimizer("Lion8bit", params, 1e-4).defaults["betas"] == (0.9, 0.99)


def test_8bit_bitsandbytes_keeps_embeddings_in_32bit_through_the_factory():
    model = EmbedAndProject()
    factory, kwargs = hf.optimizer_cls_and_kwargs("adamw_8bit", lr=1e-3)
    optimizer = factory()(model, **kwargs)
    model(torch.randint(0, 300, (4, 8))).pow(2).mean().backward()
    optimizer.step()
    assert optimizer.state[model.embed.weight]["state1"].dtype == torch.float32  # Trainer's override
    assert optimizer.state[model.q_proj.weight]["state1"].dtype == torch.uint8


def test_ademamix_32bit_steps_on_cpu():
    model = EmbedAndProject()
    optimizer = registry.create_optimizer("ademamix", model.parameters(), 1e-3)
    before = model.q_proj.weight.detach().clone()
    model(torch.randint(0, 300, (4, 8))).pow(2).mean().backward()
    optimizer.step()
    assert not torch.equal(before, model.q_proj.weight)


def test_projection_splits_param_group_dicts_and_follows_target_modules():
    # GaLore/APOLLO used to drop the projection for group dicts (galore_adamw then ran as plain AdamW)
    model = EmbedAndProject()
    named = list(model.named_parameters())
    groups = [{"params": [p for _, p in named], "param_names": [n for n, _ in named], "lr": 1e-3,
               "weight_decay": 0.1}]
    keys = {"rank": 4}
    rule = registry._projection_rule(["q_proj"])
    split = registry._with_group_keys(groups, keys, rule)
    projected = [g for g in split if g.get("rank") == 4]
    assert [g["param_names"] for g in projected] == [["q_proj.weight"]]  # not embed, not lm_head
    assert all(g["lr"] == 1e-3 and g["weight_decay"] == 0.1 for g in split)
    assert sum(len(g["params"]) for g in split) == len(named)
    # no target modules and no names: every matrix, as before
    every = registry._with_group_keys([p for _, p in named], keys, registry._projection_rule(None))
    assert sum(len(g["params"]) for g in every if g.get("rank") == 4) == 3  # embed, q_proj, lm_head weights
    assert registry.target_module_matches("all-linear", "anything")
    assert registry.target_module_matches(r".*\.q_proj", "layers.0.q_proj")
    assert not registry.target_module_matches(["v_proj"], "layers.0.q_proj")


def test_galore_through_the_factory_needs_target_modules():
    with pytest.raises(ValueError, match="optim_target_modules"):
        hf.optimizer_cls_and_kwargs("galore_adamw", lr=1e-3)


def test_layerwise_needs_training_args_and_refuses_accumulation(tmp_path):
    with pytest.raises(ValueError, match="pass training_args"):
        hf.optimizer_cls_and_kwargs("galore_adamw_layerwise", lr=1e-3, optim_target_modules=["q_proj"])
    args = transformers.TrainingArguments(output_dir=str(tmp_path), gradient_accumulation_steps=4, report_to=[])
    with pytest.raises(ValueError, match="gradient_accumulation_steps=4, must be 1"):
        hf.optimizer_cls_and_kwargs("galore_adamw_layerwise", lr=1e-3, optim_target_modules=["q_proj"],
                                    training_args=args)


def test_lomo_is_refused_with_the_route_that_works():
    with pytest.raises(ValueError, match=r"TrainingArguments\(optim='lomo'\)"):
        hf.optimizer_cls_and_kwargs("lomo", lr=1e-3)


def test_weight_decay_rule_is_the_same_in_both_routes(tmp_path):
    args = transformers.TrainingArguments(output_dir=str(tmp_path), weight_decay=0.05, report_to=[])
    model = EmbedAndProject()
    decay_names = set(transformers.Trainer.get_decay_parameter_names(None, model))

    def decay_of(optimizer):
        out = {}
        for group in optimizer.param_groups:
            for p in group["params"]:
                out[next(n for n, q in model.named_parameters() if q is p)] = group["weight_decay"]
        return out

    # factory route: TrainingArguments.weight_decay on the decay group, 0 on biases and norms
    factory, kwargs = hf.optimizer_cls_and_kwargs("adamw_torch", lr=1e-3, training_args=args)
    by_factory = decay_of(factory()(model, **kwargs))
    assert {n: wd for n, wd in by_factory.items()} == {n: (0.05 if n in decay_names else 0.0) for n in by_factory}
    # model= route: Trainer's own groups (what Trainer.create_optimizer passes) give the same
    cls, kwargs = hf.optimizer_cls_and_kwargs("HinaAdamW", model=model, lr=1e-3, training_args=args)
    trainer_groups = [{"params": [p for n, p in model.named_parameters() if n in decay_names], "weight_decay": 0.05},
                      {"params": [p for n, p in model.named_parameters() if n not in decay_names], "weight_decay": 0.0}]
    assert decay_of(cls(trainer_groups, **kwargs)) == by_factory
    # an explicit weight_decay wins in both routes
    factory, kwargs = hf.optimizer_cls_and_kwargs("HinaAdamW", lr=1e-3, weight_decay=0.2, training_args=args)
    explicit = decay_of(factory()(model, **kwargs))
    cls, kwargs = hf.optimizer_cls_and_kwargs("HinaAdamW", model=model, lr=1e-3, weight_decay=0.2)
    assert decay_of(cls(trainer_groups, **kwargs)) == explicit == {n: (0.2 if n in decay_names else 0.0)
                                                                   for n in explicit}


def test_recipe_path_relative_to_the_project_root_works_from_any_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    by_path = hf.optimizer_cls_and_kwargs(recipe="configs/llm_lora.toml")
    by_name = hf.optimizer_cls_and_kwargs(recipe="llm_lora")
    assert by_path[1] == by_name[1] and by_path[0].lr == by_name[0].lr == 6e-4  # configs/llm_lora.toml
