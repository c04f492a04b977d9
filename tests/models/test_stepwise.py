"""Continuous-batching decoding (start_rows / step_rows over DecodeRows): rows that join at different
steps, with different prompt lengths, and leave when done, get exactly the greedy text `generate`
gives each alone, for every stepwise family (BLIP captioner, BLIP-2, LLaVA)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.tiny_recipes import build_tiny, images, save_tokenizer
from vlforge.models.layers.decode_rows import DecodeRows
from vlforge.models.protocols import StepwiseGenerator, require

MAX_NEW = 8


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tokenizer(tmp_path_factory.mktemp("tok"))


def decode_continuously(model: StepwiseGenerator, image: torch.Tensor, prompts: list[str | None],
                        join_at: list[int]) -> list[list[int]]:
    """Greedy, each request joining the running batch at its step and leaving after eos or MAX_NEW."""
    eos = model.vocabulary().eos_id
    out: list[list[int]] = [[] for _ in prompts]
    rows: DecodeRows | None = None
    owners: list[int] = []  # request index of each row
    pending_logits: torch.Tensor | None = None
    step = 0
    while step <= max(join_at) or owners:
        joining = [i for i, at in enumerate(join_at) if at == step]
        if joining:
            start = model.start_rows(image[joining], [prompts[i] for i in joining])
            rows = start.rows if rows is None or not owners else DecodeRows.concat([rows, start.rows])
            pending_logits = start.logits if pending_logits is None or not owners else torch.cat([pending_logits, start.logits])
            owners = owners + joining
        if owners:
            chosen = pending_logits.argmax(dim=-1)
            for row, token in enumerate(chosen.tolist()):
                out[owners[row]].append(token)
            keep = [r for r, i in enumerate(owners) if out[i][-1] != eos and len(out[i]) < MAX_NEW]
            owners = [owners[r] for r in keep]
            if owners:
                index = torch.tensor(keep)
                rows = rows.select(index)
                pending_logits = model.step_rows(rows, chosen[index])
        step += 1
    return out


def text_of(model: StepwiseGenerator, ids: list[int]) -> str:
    vocab = model.vocabulary()
    return vocab.tokenizer.decode([t for t in ids if t != vocab.eos_id], skip_special_tokens=True).strip()


CASES = {
    "blip_caption_demo": ([None, "a picture of red", None, "a", "the shape is"],
                          lambda m, img, p: m.generate({"image": img}, num_beams=1, min_length=0,
                                                       max_length=len(m.prompt_ids(p)) + MAX_NEW) if p is None else None),
    "blip2_caption_demo": ([None, "a picture of", None, "what colour is the shape ?", "a"],
                           lambda m, img, p: m.generate({"image": img}, num_beams=1, min_length=0, max_length=MAX_NEW)
                           if p is None else None),
    "llava_finetune_demo": (["what colour is the shape ?", "what shape is on the left ?", "a", "is it red ?", None],
                            lambda m, img, p: m.generate({"image": img, "text_input": [p or ""]}, num_beams=1,
                                                         min_length=0, max_length=MAX_NEW)),
}


@pytest.mark.parametrize("recipe", sorted(CASES))
def test_rows_joining_and_leaving_decode_as_each_would_alone(recipe: str, tokenizer: Path) -> None:
    model, _ = build_tiny(recipe, tokenizer)
    model = require(model, StepwiseGenerator, "continuous batching")
    prompts, reference = CASES[recipe]
    image = images(len(prompts))
    batched = decode_continuously(model, image, prompts, join_at=[0, 0, 1, 3, 4])
    for i, prompt in enumerate(prompts):
        alone = decode_continuously(model, image[i:i + 1], [prompt], join_at=[0])[0]
        assert batched[i] == alone, (recipe, i)
        expected = reference(model, image[i:i + 1], prompt)
        if expected is not None:  # generate's own greedy text, where generate takes this prompt
            assert text_of(model, alone) == expected[0], (recipe, i)
    assert any(len(ids) > 1 for ids in batched)  # the rows decoded for more than one step
