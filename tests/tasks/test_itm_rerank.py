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
