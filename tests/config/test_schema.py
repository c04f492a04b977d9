"""Recipe composition and validation: every bad key, type or value fails with the key's full path."""
from __future__ import annotations

import pytest
from hydra.errors import HydraException
from omegaconf import OmegaConf

from vlforge.config.recipes import available_recipes, compose_recipe
from vlforge.config.schema import DataConfig, RunConfig, TrainerConfig, validate_config
from vlforge.core.errors import ConfigError


@pytest.fixture(autouse=True)
def _data_dir(tmp_path, monkeypatch):
    # The demo data node roots itself at $VLFORGE_DATA_DIR; composing and validating build nothing there.
    monkeypatch.setenv("VLFORGE_DATA_DIR", str(tmp_path / "data"))


def test_clip_demo_composes_and_validates(tmp_path):
    assert "clip_demo" in available_recipes()
    run = validate_config(compose_recipe("clip_demo"))
    assert isinstance(run, RunConfig)
    assert run.name == "clip_demo"
    assert run.run_dir == "runs/clip_demo"
    assert isinstance(run.trainer, TrainerConfig) and isinstance(run.data, DataConfig)
    assert run.trainer.max_steps == 300
    assert run.deepspeed.stage == 3
    assert run.optim.lr == pytest.approx(1e-3)
    # Interpolations are resolved, the environment variable included.
    assert run.data.demo is not None and run.data.demo.root == str(tmp_path / "data" / "demo")
    assert run.data.train.shards == str(tmp_path / "data" / "demo" / "train-*.tar")
    assert run.data.tokenizer == str(tmp_path / "data" / "demo" / "tokenizer")
    assert not (tmp_path / "data").exists()


def test_overrides_reach_the_run_config():
    run = validate_config(compose_recipe("clip_demo", ["trainer.max_steps=7", "deepspeed=zero2", "data.batch_size=4"]))
    assert run.trainer.max_steps == 7
    assert run.deepspeed.stage == 2
    assert run.data.batch_size == 4


def test_unknown_recipe_lists_available_ones():
    with pytest.raises(ValueError, match="unknown recipe 'nope'") as info:
        compose_recipe("nope")
    assert "clip_demo" in str(info.value)


def test_misspelled_key_is_named():
    # A config built outside Hydra (plain, untyped) is still checked against the schema.
    cfg = OmegaConf.create(OmegaConf.to_container(compose_recipe("clip_demo")))
    cfg.trainer.max_stepz = 3
    with pytest.raises(ConfigError, match=r"trainer\.max_stepz"):
        validate_config(cfg)


def test_appended_unknown_key_fails_validation():
    # Hydra's append syntax gets past struct mode; the schema check before any compute still stops it.
    cfg = compose_recipe("clip_demo", ["+trainer.max_stepz=3"])
    with pytest.raises(ConfigError, match=r"trainer\.max_stepz"):
        validate_config(cfg)


def test_wrong_type_is_named_at_compose():
    with pytest.raises(HydraException, match=r"trainer\.max_steps") as info:
        compose_recipe("clip_demo", ["trainer.max_steps=abc"])
    assert "abc" in str(info.value.__cause__ or info.value)


def test_bad_choice_lists_allowed_values():
    with pytest.raises(ConfigError, match=r"trainer\.precision") as info:
        validate_config(compose_recipe("clip_demo", ["trainer.precision=fp8"]))
    for allowed in ("auto", "fp32", "bf16", "fp16"):
        assert allowed in str(info.value)


def test_bad_schedule_choice():
    with pytest.raises(ConfigError, match=r"optim\.schedule"):
        validate_config(compose_recipe("clip_demo", ["optim.schedule=step"]))


def test_zero_batch_size_is_rejected():
    with pytest.raises(ConfigError, match=r"data\.batch_size must be >= 1"):
        validate_config(compose_recipe("clip_demo", ["data.batch_size=0"]))


def test_zero_max_steps_is_rejected():
    with pytest.raises(ConfigError, match=r"trainer\.max_steps must be >= 1"):
        validate_config(compose_recipe("clip_demo", ["trainer.max_steps=0"]))


def test_bad_deepspeed_stage_is_rejected():
    with pytest.raises(ConfigError, match=r"deepspeed\.stage=4"):
        validate_config(compose_recipe("clip_demo", ["deepspeed.stage=4"]))


def test_missing_node_is_named():
    cfg = compose_recipe("clip_demo")
    OmegaConf.set_struct(cfg, False)
    del cfg["logger"]
    with pytest.raises(ConfigError, match="'logger'"):
        validate_config(cfg)


def test_override_of_nonexistent_key_fails_at_compose():
    with pytest.raises(HydraException, match=r"trainer\.nonexistent"):
        compose_recipe("clip_demo", ["trainer.nonexistent=1"])


@pytest.mark.parametrize("recipe", available_recipes())
def test_every_shipped_recipe_composes_validates_and_builds_its_parts(recipe, tmp_path, monkeypatch):
    from hydra.utils import instantiate

    monkeypatch.setenv("VLFORGE_DATA_DIR", str(tmp_path))
    (tmp_path / "vqav2").mkdir()  # the VQAv2 recipes' rank mode reads its candidate answers at once
    (tmp_path / "vqav2" / "answer_list.json").write_text('["yes", "no", "2"]')
    cfg = compose_recipe(recipe)
    run = validate_config(cfg)
    assert run.name == recipe
    instantiate(cfg.task, _convert_="all")
