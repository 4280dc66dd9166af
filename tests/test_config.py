"""Recipes, variants, CLI options and --set overrides resolve into a typed, validated config."""

import pytest

from sslcli.config import build_config, load_recipe, recipe_path
from sslcli.errors import UserError
from sslcli.methods import METHODS, get_method
from sslcli.methods.base import hyperparameters


def test_every_registered_method_has_a_recipe_with_a_small_variant() -> None:
    get_method("simclr")
    for name, cls in METHODS.items():
        assert recipe_path(name).exists(), name
        cfg = build_config(name, "small", {"data": "unused"})
        assert set(cfg.method_args) <= set(hyperparameters(cls))


def test_precedence_recipe_variant_option_set() -> None:
    paper = build_config("simclr")
    assert paper.arch == "resnet50" and paper.batch_size == 4096 and paper.optim.name == "lars"
    small = build_config("simclr", "small")
    assert small.arch == "resnet18" and small.optim.weight_decay == paper.optim.weight_decay
    cfg = build_config("simclr", "small", {"epochs": 3, "optim.lr": 0.5}, ["optim.lr=0.7", "method_args.temperature=0.2"])
    assert cfg.epochs == 3 and cfg.optim.lr == 0.7 and cfg.method_args["temperature"] == 0.2
    assert isinstance(cfg.augment.views[0].scale, tuple)


def test_user_recipe_file(tmp_path) -> None:
    path = tmp_path / "mine.yaml"
    path.write_text("epochs: 7\noptim: {lr: 0.01}\n")
    cfg = build_config("mocov2", str(path))
    assert cfg.epochs == 7 and cfg.optim.lr == 0.01 and cfg.optim.name == "sgd"


@pytest.mark.parametrize(
    ("sets", "needle"),
    [
        (["optim.lrr=0.1"], "did you mean: optim.lr"),
        (["epoch=3"], "did you mean: epochs"),
        (["method_args.temprature=0.1"], "temperature"),
        (["optim.name=adam"], "must be one of"),
        (["epochs=ten"], "must be int"),
        (["noequals"], "use --set key=value"),
    ],
)
def test_bad_overrides_are_user_errors(sets: list[str], needle: str) -> None:
    with pytest.raises(UserError, match=needle):
        build_config("simclr", "small", sets=sets)


def test_unknown_method_and_variant() -> None:
    with pytest.raises(UserError, match="did you mean: simclr"):
        build_config("simclrr")
    with pytest.raises(UserError, match="unknown recipe"):
        load_recipe("simclr", "tiny")
