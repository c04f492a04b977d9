"""COCO caption metrics: hand-computed cases, agreement with pycocoevalcap used directly, and the
no-Java path (METEOR skipped with a warning, the rest still computed)."""
from __future__ import annotations

import math
import os
import shutil

import pytest

from vlforge.tasks.metrics import captioning
from vlforge.tasks.metrics.captioning import caption_metrics

REFS = {
    "1": ["a large red circle", "a red circle on the grass", "there is a big red circle"],
    "2": ["a small blue square", "one blue square"],
    "3": ["two green triangles", "a pair of green triangles"],
}
PREDS = {"1": "a red circle", "2": "a blue square", "3": "green triangles"}



@pytest.fixture(scope="module")
def with_java() -> dict[str, float]:
    if shutil.which("java") is None:
        # .ci/run installs a JRE and sets this, so METEOR's check cannot skip there unseen.
        if os.environ.get("VLFORGE_REQUIRE_JAVA") == "1":
            pytest.fail("VLFORGE_REQUIRE_JAVA=1 but no java on PATH (apt-get install default-jre-headless)")
        pytest.skip("java is not installed")
    return caption_metrics(PREDS, REFS)


def test_bleu_1_by_hand(monkeypatch) -> None:
    monkeypatch.setattr(captioning.shutil, "which", lambda name: None)  # no JVM start: plain words tokenize alike
    # Unigram precision 3/3; brevity penalty exp(1 - 4/3): the closest reference has 4 words.
    out = caption_metrics({"1": "a red circle"}, {"1": ["a large red circle"]})
    assert out["bleu_1"] == pytest.approx(math.exp(1 - 4 / 3), rel=1e-6)
    with pytest.warns(UserWarning, match="METEOR skipped"):
        exact = caption_metrics({"1": "a large red circle", "2": "one blue square"},
                                {"1": ["a large red circle"], "2": ["one blue square"]})
    assert exact["bleu_4"] == pytest.approx(1.0, abs=1e-6) and exact["rouge_l"] == pytest.approx(1.0)


def test_agrees_with_pycocoevalcap_used_directly(with_java: dict[str, float]) -> None:
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    tok = PTBTokenizer()
    gts = tok.tokenize({k: [{"caption": c} for c in v] for k, v in REFS.items()})
    res = tok.tokenize({k: [{"caption": PREDS[k]}] for k in REFS})
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    assert [with_java[f"bleu_{n}"] for n in range(1, 5)] == pytest.approx(bleu, abs=1e-12)
    assert with_java["cider"] == pytest.approx(Cider().compute_score(gts, res)[0], abs=1e-12)
    assert with_java["rouge_l"] == pytest.approx(Rouge().compute_score(gts, res)[0], abs=1e-12)
    assert 0.0 < with_java["meteor"] < 1.0


def test_without_java_meteor_is_skipped_and_the_rest_agree(with_java: dict[str, float], monkeypatch) -> None:
    monkeypatch.setattr(captioning.shutil, "which", lambda name: None)
    with pytest.warns(UserWarning) as record:
        out = caption_metrics(PREDS, REFS)
    assert str(record[0].message) == ("caption metrics: java not found, METEOR skipped (BLEU, ROUGE-L and CIDEr use a "
                                      "Python tokenizer in place of Stanford's PTBTokenizer)")
    assert "meteor" not in out
    assert out == pytest.approx({k: v for k, v in with_java.items() if k != "meteor"}, abs=1e-12)


def test_python_tokenizer_matches_ptb_on_awkward_text() -> None:
    text = "A man's dog, running... (fast)! It doesn't fit -- \"really\" ok? two-tone cat; 3.5 kg"
    assert captioning._python_tokenize(text) == (
        "a man 's dog running -lrb- fast -rrb- it does n't fit really ok two-tone cat 3.5 kg")


def test_missing_or_unknown_predictions_are_named() -> None:
    with pytest.raises(ValueError, match=r"1 image\(s\) without a prediction \['3'\]"):
        caption_metrics({"1": "a", "2": "b"}, REFS)
    with pytest.raises(ValueError, match=r"without references \['9'\]"):
        caption_metrics({**PREDS, "9": "x"}, REFS)


def test_errors_name_the_first_five_images() -> None:
    refs = {str(i): ["a cat"] for i in range(7)}
    with pytest.raises(ValueError) as info:
        caption_metrics({"6": "a cat", "x1": "a", "x2": "b", "x3": "c", "x4": "d", "x5": "e", "x6": "f"}, refs)
    assert str(info.value) == ("caption metrics: 6 image(s) without a prediction ['0', '1', '2', '3', '4'], "
                               "6 prediction(s) without references ['x1', 'x2', 'x3', 'x4', 'x5']")
    with pytest.raises(ValueError) as info:
        caption_metrics({str(i): "a cat" for i in range(7)}, {**refs, **{str(i): [] for i in range(6)}})
    assert str(info.value) == "caption metrics: 6 image(s) have no reference caption ['0', '1', '2', '3', '4']"


def test_python_tokenizer_reads_a_line_break_as_a_space() -> None:
    assert captioning._python_tokenize("a red\ncar") == "a red car"
