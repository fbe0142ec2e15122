"""--optimizer_args: kohya parsing, then checks against the constructor's signature."""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from library.hina import parse_optimizer_args
from library.hina.registry import OptimizerArgsError, create_optimizer, split_optimizer_args


def test_kohya_semantics():
    args = ["use_spd=True", "spd_lambda=0.06", "betas=(0.9, 0.99)", "wd_transition_steps=800", "eps=1e-6"]
    assert parse_optimizer_args(args, "HinaAdamW") == {
        "use_spd": True, "spd_lambda": 0.06, "betas": (0.9, 0.99), "wd_transition_steps": 800, "eps": 1e-6}
    # split at the first '=' only; a string value needs quotes, as in kohya
    assert split_optimizer_args(["name='a=b'"]) == {"name": "a=b"}
    assert split_optimizer_args({"x": 1}) == {"x": 1}
    assert split_optimizer_args(None) == {}
    assert parse_optimizer_args(["weight_decay=0"], "HinaAdamW") == {"weight_decay": 0}  # an int for a float


def test_unquoted_string_is_explained():
    with pytest.raises(OptimizerArgsError, match=r"needs quotes.*proj_type='value'"):
        split_optimizer_args(["proj_type=std"])


def test_item_without_equals():
    with pytest.raises(OptimizerArgsError, match="'use_spd' has no '='"):
        split_optimizer_args(["use_spd"])


def test_unknown_key_names_it_and_closest_keys():
    with pytest.raises(OptimizerArgsError) as info:
        parse_optimizer_args(["spd_lamda=0.1"], "HinaAdamW")
    message = str(info.value)
    assert "'spd_lamda'" in message and "did you mean spd_lambda" in message and "HinaAdamW" in message
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize("item, expected", [
    ("spd_lambda='high'", "expected a number"),
    ("use_spd=1", "expected True or False"),
    ("wd_transition_steps=80.5", "expected an int"),
    ("betas=(0.9, 0.99, 0.999)", "expected a tuple of 2"),
    ("betas=0.9", "expected a tuple of 2"),
    ("betas=('a', 0.9)", "numbers"),
])
def test_wrong_type_names_key_value_and_expected(item, expected):
    key, _, value = item.partition("=")
    with pytest.raises(OptimizerArgsError, match=expected) as info:
        parse_optimizer_args([item], "HinaAdamW")
    assert f"{key}=" in str(info.value)


@pytest.mark.parametrize("optimizer, item, expected", [
    ("AdamW_HinaAdaptive", "max_lr='high'", "expected a number or None"),
    ("HinaAdamW", "compile_step=1", "expected True, False or None"),
])
def test_optional_parameters_take_none_or_their_type(optimizer, item, expected):
    key, _, value = item.partition("=")
    assert parse_optimizer_args([f"{key}=None"], optimizer) == {key: None}
    with pytest.raises(OptimizerArgsError, match=expected):
        parse_optimizer_args([item], optimizer)
    assert parse_optimizer_args(["max_lr=0.01"], "AdamW_HinaAdaptive") == {"max_lr": 0.01}


def test_betas_length_follows_the_optimizer():
    assert parse_optimizer_args(["betas=(0.9, 0.99, 0.999)"], "AdEMAMix8bit")["betas"] == (0.9, 0.99, 0.999)


def test_lr_belongs_to_learning_rate_and_duplicates_are_refused():
    with pytest.raises(OptimizerArgsError, match="learning_rate"):
        parse_optimizer_args(["lr=1e-3"], "AdamW")
    with pytest.raises(OptimizerArgsError, match="twice"):
        split_optimizer_args(["eps=1e-8", "eps=1e-6"])


def test_validated_args_reach_the_optimizer():
    model = torch.nn.Linear(4, 4)
    optimizer = create_optimizer("HinaAdamW", model.parameters(), 1e-3, ["alora_ratio=20", "use_tam=False"])
    assert optimizer.param_groups[0]["alora_ratio"] == 20 and optimizer.param_groups[0]["use_tam"] is False


KEYS = st.sampled_from(["use_spd", "spd_lambda", "betas", "eps", "wd_transition_steps", "nope", "lr", "", "1x"])
VALUES = st.one_of(
    st.text(max_size=12), st.sampled_from(["True", "0.5", "(0.9, 0.99)", "(", "'s'", "[1,", "1e400", "800",
                                           "None", "{}", "()", "b'x'", "-(1)", "(" * 200 + ")" * 200]))
ITEMS = st.one_of(st.text(max_size=20), st.builds(lambda k, v: f"{k}={v}", KEYS, VALUES))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(ITEMS, max_size=4))
def test_random_argument_strings_give_a_result_or_a_clear_error(items):
    try:
        result = parse_optimizer_args(items, "HinaAdamW")
    except OptimizerArgsError as error:
        assert str(error)
    else:
        assert isinstance(result, dict) and len(result) == len(items)
