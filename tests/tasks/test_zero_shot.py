"""Zero-shot classification: class names and prompt templates from a recipe list or a file, and the
classifier they build from a model's text embeddings."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoTokenizer

from vlforge.datasets.demo_tokenizer import save_wordpiece_tokenizer
from vlforge.tasks.zero_shot import (
    build_zero_shot_classifier,
    describe,
    load_class_names,
    load_templates,
    zero_shot_scores,
)


def test_templates_from_a_list_a_json_file_or_lines(tmp_path: Path) -> None:
    assert load_templates(["a {}", "a photo of a {}."]) == ["a {}", "a photo of a {}."]
    as_json = tmp_path / "templates.json"
    as_json.write_text("\n  " + json.dumps(["itap of a {}.", "a bad photo of the {}."]))
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
    with pytest.raises(ValueError) as info:
        load_class_names([])
    assert str(info.value) == "zero-shot classification needs at least one class name"
    with pytest.raises(FileNotFoundError) as info:
        load_class_names(str(tmp_path / "absent.json"))
    assert str(info.value) == f"zero-shot class names file '{tmp_path / 'absent.json'}' does not exist"


class _BagOfWords(torch.nn.Module):
    """A text encoder whose embedding of a prompt is the normalised sum of its (unpadded) token vectors."""

    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.vectors = torch.randn(vocab, 8, generator=torch.Generator().manual_seed(0))

    def extract_features(self, batch: dict, mode: str) -> dict:
        assert mode == "text"
        summed = (self.vectors[batch["text_input_ids"]] * batch["text_attention_mask"][..., None]).sum(dim=1)
        return {"text_embeds": F.normalize(summed, dim=-1)}


def test_the_classifier_is_each_class_s_normalised_mean_template_embedding(tmp_path: Path) -> None:
    classes = ["red circle", "square", "big blue triangle"]
    templates = ["a photo of a {}", "{}", "a drawing of the small {} here"]  # lengths differ: padding is masked
    size = save_wordpiece_tokenizer([t.format(c) for t in templates for c in classes], 64, tmp_path)
    model = _BagOfWords(size)
    classifier = build_zero_shot_classifier(model, classes, templates, str(tmp_path), 64, torch.device("cpu"))
    tok = AutoTokenizer.from_pretrained(str(tmp_path))
    for row, name in enumerate(classes):
        # Prompt by prompt, unpadded: each template filled with this class's name.
        embeds = []
        for template in templates:
            ids = torch.tensor([tok(template.format(name))["input_ids"]])
            embeds.append(model.extract_features({"text_input_ids": ids, "text_attention_mask": torch.ones_like(ids)},
                                                 mode="text")["text_embeds"][0])
        torch.testing.assert_close(classifier[row], F.normalize(torch.stack(embeds).mean(dim=0), dim=0))
    # An image embedded where a class's prompts point is classified as that class.
    images = torch.stack([classifier[2], classifier[0], classifier[1]]) + 0.01
    scores = zero_shot_scores(F.normalize(images, dim=-1), classifier)
    assert scores.shape == (3, 3)
    rows = describe(classes, scores, torch.tensor([2, 0, 0]))
    assert rows == [{"label": "big blue triangle", "prediction": "big blue triangle"},
                    {"label": "red circle", "prediction": "red circle"},
                    {"label": "red circle", "prediction": "square"}]
