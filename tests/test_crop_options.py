"""`sslcli pretrain`'s multi-crop options rewrite the recipe's view groups, for any method."""

from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from sslcli.cli.app import app
from sslcli.config import CropOptions, apply_crop_options, build_config

runner = CliRunner()


def test_local_crops_added_to_a_two_view_recipe_take_the_first_groups_colour_settings() -> None:
    cfg = build_config("simclr", "small", crops=CropOptions(local_crops=4, local_size=16))
    first, local = cfg.augment.views
    assert (first.count, first.size, local.count, local.size, local.scale) == (2, 32, 4, 16, (0.05, 0.14))
    assert (local.jitter, local.gray_p, local.blur_p, local.flip) == (first.jitter, first.gray_p, first.blur_p,
                                                                      first.flip)


def test_options_rewrite_an_existing_local_group_and_zero_drops_it() -> None:
    cfg = build_config("swav", "small", crops=CropOptions(global_crops=3, global_scale="0.3,1", local_crops=6,
                                                          local_scale="0.05,0.2"))
    assert [(v.count, v.size, v.scale) for v in cfg.augment.views] == [(3, 32, (0.3, 1.0)), (6, 16, (0.05, 0.2))]
    assert [v.count for v in build_config("swav", "small", crops=CropOptions(local_crops=0)).augment.views] == [2]
    # --set still has the last word.
    cfg = build_config("swav", "small", sets=["augment.views=[{count: 2, size: 24}]"],
                       crops=CropOptions(local_crops=6, local_size=8))
    assert [(v.count, v.size) for v in cfg.augment.views] == [(2, 24)]


def test_asymmetric_global_groups_keep_their_own_settings() -> None:
    recipe = {"augment": {"views": [{"count": 1, "size": 224, "blur_p": 1.0}, {"count": 1, "size": 224, "blur_p": 0.1}]}}
    out = apply_crop_options(recipe, CropOptions(global_size=160, local_crops=4, local_size=96))
    assert out["augment"]["views"] == [{"count": 1, "size": 160, "blur_p": 1.0}, {"count": 1, "size": 160, "blur_p": 0.1},
                                       {"blur_p": 1.0, "count": 4, "size": 96, "scale": (0.05, 0.14)}]
    assert recipe["augment"]["views"][0]["size"] == 224  # the input is not modified


def test_the_written_run_config_holds_the_groups(synth_data: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    result = runner.invoke(app, ["pretrain", "swav", "--recipe", "small", "--epochs", "1", "--batch-size", "100",
                                 "--num-workers", "0", "--device", "cpu", "--data", str(synth_data), "--out", str(out),
                                 "--global-size", "24", "--global-scale", "0.5,1", "--local-crops", "3",
                                 "--local-size", "12"])
    assert result.exit_code == 0, result.output
    views = yaml.safe_load((out / "config.yaml").read_text())["augment"]["views"]
    assert [(v["count"], v["size"], v["scale"]) for v in views] == [(2, 24, [0.5, 1.0]), (3, 12, [0.1, 0.4])]


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--local-crops", "4"], "--local-crops 4 needs --local-size PX"),
        (["--local-size", "16"], "need --local-crops N"),
        (["--global-scale", "0.5"], "bad --global-scale '0.5'; write LO,HI"),
        (["--local-crops", "2", "--local-size", "16", "--local-scale", "0.3,0.1"], "LO <= HI"),
        (["--global-scale", "0,1"], "areas in (0, 1]"),
        (["--global-crops", "0"], "--global-crops must be at least 1"),
        (["--local-crops", "0", "--local-size", "16"], "contradict --local-crops 0"),
    ],
)
def test_bad_crop_options_are_one_line_user_errors(args: list[str], needle: str) -> None:
    result = runner.invoke(app, ["pretrain", "simclr", "--recipe", "small", "--data", "DATA", *args])
    assert result.exit_code == 2, result.output
    assert "error:" in result.output and needle in result.output and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) <= 3  # one message (rich may wrap it)
