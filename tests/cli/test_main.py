"""The `vlforge` command's parser and its look-up subcommands, by value, in this process."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

import vlforge
from vlforge.cli import catalog
from vlforge.cli.main import build_parser, main
from vlforge.config.recipes import RECIPES_DIR, available_recipes
from vlforge.hub import export
from vlforge.hub.zoo import model_zoo

COMMANDS = ["train", "eval", "serve", "export", "make-shards", "slurm", "recipes", "zoo"]


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--version"]) == 0
    assert capsys.readouterr().out == f"vlforge {vlforge.__version__}\n"


def test_help_lists_every_command(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: vlforge [-h] [--version] COMMAND ...")
    for command in COMMANDS:
        assert f"\n    {command}" in out, command
    assert set(build_parser()[1]) == set(COMMANDS)


@pytest.mark.parametrize("command", ["train", "eval", "export", "recipes", "zoo"])
def test_each_command_has_help(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([command, "--help"]) == 0
    assert capsys.readouterr().out.startswith(f"usage: vlforge {command} [-h]")


def test_slurm_help_is_its_own(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["slurm", "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: vlforge slurm [-h] [--nodes NODES]") and "--gpus-per-node" in out


@pytest.mark.parametrize("argv, message", [
    ([], "the following arguments are required: COMMAND"),
    (["trian"], "invalid choice: 'trian'"),
    (["--bogus", "zoo"], "unrecognized arguments: --bogus"),
    (["zoo", "blip_caption", "extra"], "unrecognized arguments: extra"),
    (["recipes", "--bogus"], "unrecognized arguments: --bogus"),
    (["export", "only_source"], "the following arguments are required: OUT_DIR"),
    (["train", "--nproc", "0", "recipe=clip_demo"], "argument --nproc: must be >= 1, got 0"),
    (["train", "--nproc", "two", "recipe=clip_demo"], "argument --nproc: invalid"),
])
def test_bad_arguments_are_usage_errors(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "usage: vlforge" in err and message in err, err
    assert "Traceback" not in err


def test_recipes_lists_every_recipe_with_its_description(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["recipes"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == available_recipes()
    clip = next(line for line in lines if line.split()[0] == "clip_demo")
    assert clip.split(None, 1)[1] == "CLIP on the built-in demo scenes: a small ResNet and text tower..."
    assert "@package" not in "\n".join(lines)


def test_recipe_summary(tmp_path: Path) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text("# @package _global_\n# A short one (with a note). Second sentence.\ndefaults: []\n# later\n")
    assert catalog.recipe_summary(recipe) == "A short one (with a note)."
    recipe.write_text("# A long one (with a long parenthesis) that goes on: a clause, another clause\n"
                      "# continued on a second line; and more.\n")
    assert catalog.recipe_summary(recipe, width=90) == ("A long one that goes on: a clause, another clause "
                                                        "continued on a second line; and more.")
    assert catalog.recipe_summary(recipe, width=85) == ("A long one that goes on: a clause, another clause "
                                                        "continued on a second line...")
    assert catalog.recipe_summary(recipe, width=60) == "A long one that goes on: a clause..."
    assert catalog.recipe_summary(recipe, width=20) == "A long one that..."  # no clause fits: whole words
    recipe.write_text("name: bare\n")
    assert catalog.recipe_summary(recipe) == ""
    # Every real recipe has one, and it fits.
    for name in available_recipes():
        summary = catalog.recipe_summary(RECIPES_DIR / "recipe" / f"{name}.yaml")
        assert 0 < len(summary) <= catalog.SUMMARY_WIDTH, name


def test_recipe_name_prints_its_composed_config(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["recipes", "clip_demo"]) == 0
    cfg = yaml.safe_load(capsys.readouterr().out)
    assert cfg["name"] == "clip_demo" and cfg["run_dir"] == "runs/${name}"
    assert cfg["model"]["_target_"] == "vlforge.models.clip.model.CLIP"
    assert cfg["trainer"]["max_steps"] == 300 and cfg["optim"]["lr"] == 1e-3

    assert main(["recipes", "clip_demo", "trainer.max_steps=7", "deepspeed=zero2", "--resolve"]) == 0
    cfg = yaml.safe_load(capsys.readouterr().out)
    assert cfg["trainer"]["max_steps"] == 7 and cfg["deepspeed"]["stage"] == 2
    assert cfg["run_dir"] == "runs/clip_demo"


def test_unknown_recipe_is_named_with_close_matches(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["recipes", "clip_dem"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: vlforge recipes")
    assert "vlforge recipes: error: unknown recipe 'clip_dem'; did you mean clip_demo? " in err
    assert main(["recipes", "qqq"]) == 2
    assert "unknown recipe 'qqq' (`vlforge recipes` lists them all)" in capsys.readouterr().err


def test_recipe_with_a_bad_override(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["recipes", "clip_demo", "trainer.max_stepz=7"]) == 2
    err = capsys.readouterr().err
    assert "recipe clip_demo: Could not override 'trainer.max_stepz'" in err and "Traceback" not in err
    assert main(["recipes", "trainer.max_steps=7"]) == 2  # an override where the name goes
    assert "unknown recipe 'trainer.max_steps=7'" in capsys.readouterr().err


def test_zoo(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["zoo"]) == 0
    out = capsys.readouterr().out
    assert out == f"{model_zoo}\n"
    assert any(line.split()[:2] == ["blip_caption", "base_coco"] for line in out.splitlines())


def test_zoo_name_lists_its_types(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["zoo", "blip_caption"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["model_type", "source", "recipe", "weights", "description"]
    rows = [line.split()[:4] for line in lines[2:] if line and not line.startswith("load")]
    lavis = "url:https://storage.googleapis.com/sfr-vision-language-research"
    assert rows == [["base_coco", "hf", "blip_caption", "hf:Salesforce/blip-image-captioning-base"],
                    ["large_coco", "hf", "blip_caption", "hf:Salesforce/blip-image-captioning-large"],
                    ["demo", "vlforge", "blip_caption_demo", "run:runs/blip_caption_demo"],
                    ["base_coco", "lavis", "blip_caption", f"{lavis}/LAVIS/models/BLIP/blip_coco_caption_base.pth"],
                    ["large_coco", "lavis", "blip_caption", f"{lavis}/BLIP/models/model_large_caption.pth"]]
    assert lines[-1] == ('load one with vlforge.load_model("blip_caption", "<model_type>"), or of one source with '
                         'source="<source>" (the first row of a type is the default)')


def test_unknown_zoo_name(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["zoo", "blip_captions"]) == 2
    err = capsys.readouterr().err
    assert "vlforge zoo: error: unknown model 'blip_captions'; did you mean " in err
    assert "blip_caption" in err and "`vlforge zoo` lists them all" in err


def test_slurm_renders_a_script_that_runs_the_command(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["slurm", "--nodes", "2", "--gpus-per-node", "0", "--python", "/opt/py/bin/python",
                 "recipe=clip_demo", "trainer.max_steps=10"]) == 0
    script = capsys.readouterr().out
    assert "#SBATCH --job-name=vlforge-clip_demo" in script and "#SBATCH --nodes=2" in script
    assert script.rstrip().endswith("srun --kill-on-bad-exit=1 --cpu-bind=none /opt/py/bin/python -m vlforge.cli "
                                    "train recipe=clip_demo trainer.max_steps=10 trainer.resume=auto")
    assert main(["slurm", "trainer.max_steps=10"]) == 2
    assert "recipe=<name>" in capsys.readouterr().err


def test_export_runs_the_export_module(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[list[str]] = []
    monkeypatch.setattr(export, "main", lambda argv: seen.append(argv) or 3)
    assert main(["export", "runs/clip_demo", "out dir", "--overwrite"]) == 3  # its exit status
    assert seen == [["runs/clip_demo", "out dir", "--overwrite"]]


def test_make_shards_takes_its_arguments_and_names_itself(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["make-shards", "--help"]) == 0
    assert capsys.readouterr().out.startswith("usage: vlforge make-shards")
    assert main(["make-shards", "caption", "--ann", "missing.json"]) == 2  # its own parser: --image-root, --out missing

@pytest.mark.parametrize("argv, message", [
    (["serve"], "name what to serve"),
    (["serve", "blip_caption"], "NAME:TYPE"),
    (["serve", "serve.replicas=2"], "name what to serve"),
    (["serve", "blip_caption:base_coco", "serve.replicas=2", "model.text.layers=2"], "checkpoint= only"),
    (["serve", "recipe=clip_demo", "serve.replicas=2", "model.nope=1"], "model.nope"),
    (["serve", "recipe=clip_demo", "serve.port=70000"], "serve.port must be in 1..65535"),
    (["serve", "recipe=llava_finetune_demo", "serve.device_map=balanced"], "expected auto or a {module: device} map"),
    (["serve", "recipe=llava_finetune_demo", "serve.device_map=auto", "serve.quantize=4bit"], "held on one device"),
    (["serve", "recipe=llava_finetune_demo", "serve.replicas=2", "serve.device_map=auto"], "set serve.gpus_per_replica"),
    (["serve", "recipe=clip_demo", "serve.batching.max_runing=4"], "serve.batching.max_runing"),
    (["serve", "blip_caption:base_coco", "model.text.layers=2"], "takes serve.* overrides and checkpoint= only"),
])
def test_serve_refuses_what_cannot_run_before_loading_anything(argv: list[str], message: str,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    assert main(argv) == 2
    assert message in capsys.readouterr().err
