"""Zero-shot class names and prompt templates, from a recipe list or a file."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from vlforge.tasks.zero_shot import load_class_names, load_templates


def test_templates_from_a_list_a_json_file_or_lines(tmp_path: Path) -> None:
    assert load_templates(["a {}", "a photo of a {}."]) == ["a {}", "a photo of a {}."]
    as_json = tmp_path / "templates.json"
    as_json.write_text(json.dumps(["itap of a {}.", "a bad photo of the {}."]))
    assert load_templates(str(as_json)) == ["itap of a {}.", "a bad photo of the {}."]
    as_lines = tmp_path / "templates.txt"
    as_lines.write_text("a photo of a {}.\n\n  a drawing of a {}.  \n")
    assert load_templates(str(as_lines)) == ["a photo of a {}.", "a drawing of a {}."]


def test_templates_without_a_slot_or_missing_file_are_named(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="must each contain"):
        load_templates(["a photo of a {}.", "a photo"])
    with pytest.raises(FileNotFoundError, match="templates.txt"):
        load_templates(str(tmp_path / "templates.txt"))


def test_class_names_from_a_file(tmp_path: Path) -> None:
    path = tmp_path / "classes.json"
    path.write_text(json.dumps(["tench", "goldfish"]))
    assert load_class_names(str(path)) == ["tench", "goldfish"]
    with pytest.raises(ValueError, match="at least one class"):
        load_class_names([])
