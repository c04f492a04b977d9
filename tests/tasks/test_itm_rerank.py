"""ITM re-ranking: the top-k of each row re-scored by the ITM head, the same on one rank or two."""
from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.distributed as dist

from tests.e2e.conftest import free_port
from vlforge.tasks.itm_rerank import UNRANKED, itm_rerank
from vlforge.tasks.metrics.retrieval import recall_at_k

OWNERS = [0, 0, 1, 2, 2, 3, 4, 4, 4]  # caption -> image


class FakeITM(torch.nn.Module):
    """Image tokens carry the image index, a caption's single token its owner: ITM says 10 on a match."""

    def itm_match_scores(self, image_tokens: torch.Tensor, input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return 10.0 * (image_tokens[:, 0, 0] == input_ids[:, 0]).float()


def fake_tokenizer(texts, **kwargs):
    ids = torch.tensor([[int(t)] for t in texts])
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def _inputs():
    gen = torch.Generator().manual_seed(0)
    sim = torch.rand(5, len(OWNERS), generator=gen)  # an ITC that knows nothing
    tokens = [torch.full((1, 1), float(i)) for i in range(5)]
    captions = [str(o) for o in OWNERS]
    return sim, tokens, captions


def _run(k: int) -> tuple[torch.Tensor, torch.Tensor]:
    sim, tokens, captions = _inputs()
    return itm_rerank(FakeITM(), sim, tokens, captions, fake_tokenizer, 8, k, torch.device("cpu"), pairs_per_forward=4)


def test_top_k_rescored_by_itm_plus_itc() -> None:
    sim, _, _ = _inputs()
    i2t, t2i = _run(k=len(OWNERS))  # every pair re-scored: ITM finds every match
    expected = sim + 10.0 * (torch.arange(5)[:, None] == torch.tensor(OWNERS)[None]).float()
    torch.testing.assert_close(i2t, expected)
    torch.testing.assert_close(t2i, expected.t())
    assert recall_at_k(i2t, OWNERS, sim_t2i=t2i)["txt_r1"] == recall_at_k(i2t, OWNERS, sim_t2i=t2i)["img_r1"] == 1.0
    i2t, _ = _run(k=2)
    reranked = i2t > UNRANKED / 2
    assert (reranked.sum(dim=1) == 2).all()  # only each row's ITC top-2 is re-scored
    top2 = sim.topk(2, dim=1).indices
    assert all(set(reranked[r].nonzero().flatten().tolist()) == set(top2[r].tolist()) for r in range(5))
    torch.testing.assert_close(i2t[~reranked], (sim + UNRANKED)[~reranked])  # the rest keep ITC's order


def _worker(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        torch.save(_run(k=3), Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_ranks_give_the_matrices_of_one(tmp_path: Path) -> None:
    import torch.multiprocessing as mp

    mp.spawn(_worker, args=(free_port(), str(tmp_path)), nprocs=2, join=True)
    single = _run(k=3)
    for rank in range(2):
        i2t, t2i = torch.load(tmp_path / f"rank{rank}.pt")
        torch.testing.assert_close(i2t, single[0])
        torch.testing.assert_close(t2i, single[1])


def test_every_itm_model_gives_what_reranking_reads() -> None:
    """BLIP, ALBEF and BLIP-2 give the ITM tokens and the ITC embeddings from one tower forward, and
    re-ranking runs on them."""
    from vlforge.models.albef.model import ALBEF
    from vlforge.models.blip.retrieval import BlipRetrieval
    from vlforge.models.blip2.pretrain import Blip2Pretrain

    vision = dict(name="vit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=4)
    text = dict(vocab_size=50, width=32, layers=2, heads=4, intermediate=64, max_len=16)
    qformer = dict(num_queries=4, width=32, layers=2, heads=4, intermediate=64, vocab_size=50, max_len=16)
    images = torch.randint(0, 255, (3, 3, 32, 32), dtype=torch.uint8)
    ids = torch.tensor([[1, 5, 6, 2], [1, 7, 8, 2], [1, 9, 10, 2]])
    torch.manual_seed(0)
    for model in (BlipRetrieval(vision, text, 16), ALBEF(vision, {**text, "layers": 4}, embed_dim=16, fusion_layer=2),
                  Blip2Pretrain(vision, qformer, embed_dim=16, bos_token_id=3, eos_token_id=2)):
        model.eval()
        with torch.no_grad():
            tokens, embeds = model.image_features(images)
            torch.testing.assert_close(embeds, model.encode_image(images))
            sim = torch.rand(3, 3)
            tok = lambda texts, **kw: {"input_ids": ids[[int(t) for t in texts]], "attention_mask": torch.ones(len(texts), 4, dtype=torch.long)}
            i2t, t2i = itm_rerank(model, sim, list(tokens), ["0", "1", "2"], tok, 8, 3, torch.device("cpu"))
        scores = model.itm_match_scores(tokens, ids, torch.ones_like(ids))
        torch.testing.assert_close(i2t.diagonal(), scores + sim.diagonal())  # every pair re-scored (k = all)
        assert t2i.shape == (3, 3)
