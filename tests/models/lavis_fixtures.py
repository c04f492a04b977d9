"""The LAVIS fixtures of tests/fixtures/lavis: tiny models built and run by LAVIS's own code
(make_fixtures.py there, in a LAVIS environment), their weights as LAVIS checkpoints and their
outputs. The tests load the .pth files with `load_model` and compare at TOL."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from vlforge.core.tokenizers import load_tokenizer
from vlforge.tasks.itm_rerank import itm_rerank

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "lavis"

TOL = dict(rtol=1e-5, atol=1e-5)

# The fixtures' sizes (make_fixtures.py): the zoo rows' recipes hold the published ones.
IMAGE_SIZE = 64
_VOCAB = len((FIXTURES / "vocab.txt").read_text().split("\n")) - 1


def tiny_overrides(vocab_extra: int = 2, embed: bool = False) -> list[str]:
    """Recipe overrides giving a zoo row the fixtures' dimensions: `vocab_extra` tokens LAVIS adds to
    BERT's vocabulary (BLIP: [DEC] and [ENC])."""
    out = ["model.vision.name=vit_base_patch16_224", f"model.vision.img_size={IMAGE_SIZE}", "model.vision.patch_size=16",
           "model.vision.embed_dim=48", "model.vision.depth=2", "model.vision.num_heads=4",
           f"model.text.vocab_size={_VOCAB + vocab_extra}", "model.text.width=32", "model.text.layers=2",
           "model.text.heads=4", "model.text.intermediate=64", "model.text.max_len=64",
           f"data.train_image.size={IMAGE_SIZE}", f"data.eval_image.size={IMAGE_SIZE}"]
    return ["++" + o for o in out + (["model.embed_dim=16"] if embed else [])]


def weights(name: str) -> Path:
    return FIXTURES / f"{name}.pth"


def expected(name: str) -> dict[str, Any]:
    return torch.load(FIXTURES / f"{name}.expected.pt", weights_only=True)


@pytest.fixture
def offline_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No hub, and a fresh $VLFORGE_HOME (the tokenizers with LAVIS's added tokens are written there)."""
    monkeypatch.setenv("VLFORGE_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def tokens(model: Any, texts: list[str], max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`texts` through the model's tokenizer, padded to the longest, as LAVIS tokenizes them."""
    encoded = load_tokenizer(model.tokenizer_name)(texts, padding="longest", truncation=True, max_length=max_len,
                                                   return_tensors="pt")
    return encoded.input_ids, encoded.attention_mask


def assert_retrieval_matches(model: Any, ref: dict[str, Any]) -> None:
    """The ITC similarities and LAVIS's retrieval scores (compute_sim_matrix: the ITM match logit plus
    the similarity for each row's k_test best, -100 elsewhere) of `ref`, through vlforge's re-ranking."""
    ids, mask = tokens(model, ref["texts"], 35)
    with torch.no_grad():
        image_tokens, image_emb = model.image_features(ref["pixels"])
        sim = image_emb @ model.encode_text(ids, mask).t()
    torch.testing.assert_close(sim, ref["itc_similarity"], **TOL)
    i2t, t2i = itm_rerank(model, sim, list(image_tokens), ref["texts"], load_tokenizer(model.tokenizer_name), 35,
                          ref["k_test"], torch.device("cpu"))
    for ours, theirs in ((i2t, ref["scores_i2t"]), (t2i, ref["scores_t2i"])):
        ranked = theirs > -100
        assert torch.equal(ranked, ours > -100)
        torch.testing.assert_close(ours[ranked], theirs[ranked], **TOL)


def assert_ranked_answers(model: Any, ref: dict[str, Any]) -> None:
    """LAVIS's rank-mode answers of `ref` among all its candidates and among the 3 whose first token
    is likeliest."""
    ids, mask = tokens(model, ref["questions"], 35)
    answers, answer_mask = tokens(model, ref["answer_list"], 35)
    for k, key in ((len(ref["answer_list"]), "ranked_answers"), (3, "ranked_answers_top3")):
        best = model.rank_answers(ref["pixels"], ids, mask, answers, answer_mask, k=k)
        assert [ref["answer_list"][i] for i in best] == ref[key], key
