"""The capabilities tasks and the server rely on: which model offers which, and the error a recipe
gets when it pairs a task with a model that cannot serve it."""
from __future__ import annotations

import pytest
import torch

from vlforge.models.albef.model import ALBEF
from vlforge.models.blip.caption import BlipCaptioner
from vlforge.models.blip.retrieval import BlipRetrieval
from vlforge.models.blip.vqa import BlipVQA
from vlforge.models.blip2.causal_lm import Blip2CausalLM
from vlforge.models.blip2.pretrain import Blip2Pretrain
from vlforge.models.clip.model import CLIP
from vlforge.models.llava.model import Llava
from vlforge.models.protocols import (
    AnswerPredictor,
    AnswerRanker,
    FeatureExtractor,
    ImageTextMatcher,
    PromptedGenerator,
    StepwiseGenerator,
    TextGenerator,
    require,
)
from vlforge.models.siglip.model import SigLIP
from vlforge.tasks.captioning import CaptionTask

CAPABILITIES = (TextGenerator, FeatureExtractor, AnswerPredictor, AnswerRanker, ImageTextMatcher, PromptedGenerator,
                StepwiseGenerator)
EXPECTED = {
    BlipCaptioner: {TextGenerator, StepwiseGenerator},
    Blip2CausalLM: {TextGenerator, StepwiseGenerator},
    Llava: {TextGenerator, PromptedGenerator, StepwiseGenerator},
    BlipVQA: {AnswerPredictor, AnswerRanker},
    BlipRetrieval: {FeatureExtractor, ImageTextMatcher},
    ALBEF: {FeatureExtractor, ImageTextMatcher},
    Blip2Pretrain: {FeatureExtractor, ImageTextMatcher},
    CLIP: {FeatureExtractor},
    SigLIP: {FeatureExtractor},
}


@pytest.mark.parametrize("model_class", list(EXPECTED), ids=lambda c: c.__name__)
def test_each_model_offers_exactly_its_capabilities(model_class: type) -> None:
    offered = {capability for capability in CAPABILITIES if issubclass(model_class, capability)}
    assert offered == EXPECTED[model_class]


class _Embedder(torch.nn.Module):
    def extract_features(self, samples: dict, mode: str = "multimodal", max_text_len: int = 64) -> dict:
        return {}


def test_require_returns_a_capable_model_and_names_what_an_incapable_one_lacks() -> None:
    model = _Embedder()
    assert require(model, FeatureExtractor, "zero-shot") is model
    with pytest.raises(TypeError, match=r"task.itm_rerank_k > 0 needs a model with image_features, itm_match_scores "
                                        r"\(ImageTextMatcher\); _Embedder lacks image_features, itm_match_scores"):
        require(model, ImageTextMatcher, "task.itm_rerank_k > 0")


def test_a_caption_task_refuses_a_model_that_cannot_generate_before_reading_data() -> None:
    with pytest.raises(TypeError, match="the caption task needs a model with generate .*_Embedder lacks generate"):
        CaptionTask().evaluate(_Embedder(), "val", data=None, dist_env=None, seed=0)
