"""Classification accuracy and retrieval recall on matrices small enough to score by hand."""
from __future__ import annotations

import pytest
import torch

from vlforge.tasks.metrics.classification import per_class_accuracy, topk_accuracy
from vlforge.tasks.metrics.retrieval import recall_at_k

# --- topk_accuracy ----------------------------------------------------------------------------------

# 4 samples x 3 classes. Rank of the true label in each row:
#   row 0: label 0, scores 0.7 > 0.2 > 0.1          -> rank 0
#   row 1: label 0, scores 0.5 > 0.3 > 0.2          -> rank 0
#   row 2: label 2, 0.6 > 0.3 > 0.1                 -> rank 0
#   row 3: label 0, 0.5 (c1) > 0.3 (c2) > 0.2 (c0)  -> rank 2
SCORES = torch.tensor(
    [
        [0.7, 0.2, 0.1],
        [0.5, 0.3, 0.2],
        [0.1, 0.3, 0.6],
        [0.2, 0.5, 0.3],
    ]
)
LABELS = torch.tensor([0, 0, 2, 0])


def test_topk_accuracy_by_hand():
    out = topk_accuracy(SCORES, LABELS, ks=(1, 2, 5))
    assert out["top1"] == pytest.approx(3 / 4)
    assert out["top2"] == pytest.approx(3 / 4)  # row 3's label is third
    assert out["top5"] == pytest.approx(1.0)  # k capped at the 3 classes: every label is found
    # Per class top-1: class 0 rows {0, 1, 3} -> 2/3, class 2 row {2} -> 1; class 1 has no sample and is skipped.
    assert out["mean_per_class"] == pytest.approx((2 / 3 + 1.0) / 2)
    assert set(out) == {"top1", "top2", "top5", "mean_per_class"}


def test_per_class_accuracy_skips_classes_without_samples():
    # class 0: rows 0, 1 right, row 3 wrong; class 1 has no sample; class 2: row 2 right.
    assert per_class_accuracy(SCORES, LABELS) == pytest.approx({0: 2 / 3, 2: 1.0})


def test_topk_accuracy_default_ks():
    out = topk_accuracy(SCORES, LABELS)
    assert set(out) == {"top1", "top5", "mean_per_class"}
    assert out["top1"] == pytest.approx(0.75) and out["top5"] == pytest.approx(1.0)


def test_topk_accuracy_perfect_and_wrong():
    scores = torch.eye(3)
    assert topk_accuracy(scores, torch.tensor([0, 1, 2]), ks=(1,)) == {"top1": 1.0, "mean_per_class": 1.0}
    assert topk_accuracy(scores, torch.tensor([1, 2, 0]), ks=(1,)) == {"top1": 0.0, "mean_per_class": 0.0}


# --- recall_at_k ------------------------------------------------------------------------------------

# 2 images x 4 captions; captions 0, 1 describe image 0 and captions 2, 3 image 1.
TEXT_TO_IMAGE = [0, 0, 1, 1]


def _sim(image1_caption0: float) -> torch.Tensor:
    return torch.tensor(
        [
            [0.9, 0.1, 0.5, 0.3],
            [image1_caption0, 0.2, 0.4, 0.3],
        ]
    )


def test_recall_at_k_by_hand_with_ties():
    # image -> text (rank of the best positive = number of captions scoring strictly higher):
    #   image 0: best positive caption 0 (0.9), nothing higher                       -> rank 0
    #   image 1: best positive caption 2 (0.4); caption 0 (a negative) ties at 0.4  -> rank 0 (tie favours the positive)
    # text -> image:
    #   caption 0: [0.9, 0.4], positive image 0 -> rank 0
    #   caption 1: [0.1, 0.2], positive image 0 -> rank 1
    #   caption 2: [0.5, 0.4], positive image 1 -> rank 1
    #   caption 3: [0.3, 0.3], positive image 1 ties image 0 -> rank 0
    out = recall_at_k(_sim(0.4), TEXT_TO_IMAGE, ks=(1, 5))
    assert out["txt_r1"] == pytest.approx(1.0)
    assert out["txt_r5"] == pytest.approx(1.0)
    assert out["img_r1"] == pytest.approx(2 / 4)
    assert out["img_r5"] == pytest.approx(1.0)
    assert out["txt_r_mean"] == pytest.approx(1.0)
    assert out["img_r_mean"] == pytest.approx(0.75)
    assert out["r_mean"] == pytest.approx(0.875)


def test_recall_at_k_negative_strictly_higher():
    # Caption 0 now beats image 1's best positive (0.41 > 0.4): image 1 drops to rank 1.
    out = recall_at_k(_sim(0.41), TEXT_TO_IMAGE, ks=(1, 5))
    assert out["txt_r1"] == pytest.approx(1 / 2)
    assert out["txt_r5"] == pytest.approx(1.0)
    assert out["img_r1"] == pytest.approx(2 / 4)  # caption 0: [0.9, 0.41] -> still rank 0
    assert out["r_mean"] == pytest.approx(((0.5 + 1.0) / 2 + (0.5 + 1.0) / 2) / 2)


def test_recall_at_k_default_ks_and_rank_cutoffs():
    out = recall_at_k(_sim(0.41), TEXT_TO_IMAGE)
    assert set(out) == {
        "txt_r1", "txt_r5", "txt_r10", "img_r1", "img_r5", "img_r10", "txt_r_mean", "img_r_mean", "r_mean"
    }
    assert out["txt_r10"] == 1.0 and out["img_r10"] == 1.0
    assert out["txt_r_mean"] == pytest.approx((0.5 + 1 + 1) / 3)
    assert out["img_r_mean"] == pytest.approx((0.5 + 1 + 1) / 3)
    assert out["r_mean"] == pytest.approx((0.5 + 1 + 1) / 3)


def test_recall_at_k_image_without_caption_is_never_retrieved():
    sim = torch.tensor([[0.9, 0.8], [0.1, 0.2]])
    out = recall_at_k(sim, [0, 0], ks=(1, 2))
    assert out["txt_r1"] == pytest.approx(0.5)  # image 1 has no caption
    assert out["txt_r2"] == pytest.approx(0.5)
    assert out["img_r1"] == pytest.approx(1.0)


def test_recall_at_k_matching_by_wording():
    # 3 images; image 0 and image 2 both have the caption "a red circle" (texts 0 and 4).
    captions = ["a red circle", "a red circle left of a square", "a blue star", "a big blue star", "a red circle"]
    text_to_image = [0, 0, 1, 1, 2]
    sim = torch.tensor([
        [0.2, 0.1, 0.0, 0.0, 0.9],  # image 0's best text is image 2's "a red circle": same wording -> hit
        [0.0, 0.0, 0.1, 0.8, 0.95],  # image 1: "a red circle" beats its own captions -> rank 1
        [0.9, 0.0, 0.0, 0.0, 0.1],  # image 2's best text is image 0's "a red circle" -> hit
    ])
    by_id = recall_at_k(sim, text_to_image, ks=(1,))
    by_wording = recall_at_k(sim, text_to_image, ks=(1,), captions=captions)
    assert by_id["txt_r1"] == pytest.approx(0.0)
    assert by_wording["txt_r1"] == pytest.approx(2 / 3)
    # text -> image: text 0 ranks image 2 first (0.9): a hit by wording (image 2 has "a red circle"),
    # a miss by id; text 1 ranks image 0 first; texts 2, 3 rank image 1 first (hits); text 4 ranks image 1
    # (0.95) above both images worded "a red circle": a miss either way.
    assert by_id["img_r1"] == pytest.approx(3 / 5)
    assert by_wording["img_r1"] == pytest.approx(4 / 5)


def test_recall_at_k_captions_must_match_texts():
    with pytest.raises(ValueError, match="2 captions for 3 texts"):
        recall_at_k(torch.zeros(2, 3), [0, 0, 1], captions=["a", "b"])


def test_recall_at_k_image_without_caption_anywhere_in_the_matrix():
    # Image 0 has no caption; images 1 and 2 still rank their own.
    # Image 1 ranks its own captions second and third, image 2 its own first.
    sim = torch.tensor([[0.9, 0.8, 0.7], [0.5, 0.4, 0.9], [0.3, 0.2, 0.8]])
    out = recall_at_k(sim, [1, 1, 2], ks=(1, 2))
    assert (out["txt_r1"], out["txt_r2"]) == (pytest.approx(1 / 3), pytest.approx(2 / 3))


def test_recall_at_k_ranks_images_by_the_text_to_image_matrix_when_given():
    sim_i2t = torch.eye(2)
    swapped = torch.tensor([[0.0, 1.0], [1.0, 0.0]])  # each text prefers the other image
    out = recall_at_k(sim_i2t, [0, 1], ks=(1,), sim_t2i=swapped)
    assert out["txt_r1"] == 1.0 and out["img_r1"] == 0.0
