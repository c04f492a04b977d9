"""COCO caption metrics (BLEU-1..4, METEOR, ROUGE-L, CIDEr) through pycocoevalcap, as papers report them.

pycocoevalcap tokenizes with Stanford's PTBTokenizer and scores METEOR with a jar, both on Java.
Without Java, METEOR is skipped with a warning and a Python tokenizer stands in: lowercase, split
off punctuation, drop the tokens PTBTokenizer's wrapper drops (identical on plain-word captions).
"""
from __future__ import annotations

import re
import shutil
import warnings
from typing import Mapping, Sequence

# The tokens pycocoevalcap removes after PTB tokenization.
_PUNCTUATION_TOKENS = {"''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!", ",", ":", "-", "--",
                       "...", ";"}
# PTB keeps hyphenated words and decimals whole, splits clitics ("dog's" -> "dog 's", "doesn't" ->
# "does n't"), turns double quotes into `` / '' (then dropped) and, lowercased, brackets into -lrb- etc.
# (not in the dropped list, so they stay).
_TOKEN = re.compile(r"\.\.\.|--|[a-z0-9]+(?=n't)|n't|[a-z0-9]+(?:[-.][a-z0-9]+)*|'[a-z]+|[^\sa-z0-9]")
_BRACKETS = {"(": "-lrb-", ")": "-rrb-", "{": "-lcb-", "}": "-rcb-", '"': "''"}


def _python_tokenize(text: str) -> str:
    tokens = (_BRACKETS.get(t, t) for t in _TOKEN.findall(text.lower().replace("\n", " ")))
    return " ".join(t for t in tokens if t not in _PUNCTUATION_TOKENS)


def _tokenize(captions: Mapping[str, Sequence[str]], java: bool) -> dict[str, list[str]]:
    if not java:
        return {key: [_python_tokenize(c) for c in caps] for key, caps in captions.items()}
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    return PTBTokenizer().tokenize({key: [{"caption": c} for c in caps] for key, caps in captions.items()})


def caption_metrics(predictions: Mapping[str, str], references: Mapping[str, Sequence[str]]) -> dict[str, float]:
    """Corpus scores of one predicted caption per image against that image's reference captions.

    Keys: bleu_1..bleu_4, meteor (when Java is there), rouge_l, cider. Every image with references
    needs a prediction, and no prediction may lack references (the error names them).
    """
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    missing = sorted(set(references) - set(predictions))
    unknown = sorted(set(predictions) - set(references))
    if missing or unknown:
        raise ValueError(f"caption metrics: {len(missing)} image(s) without a prediction {missing[:5]}, "
                         f"{len(unknown)} prediction(s) without references {unknown[:5]}")
    empty = sorted(key for key, refs in references.items() if not refs)
    if empty:
        raise ValueError(f"caption metrics: {len(empty)} image(s) have no reference caption {empty[:5]}")
    java = shutil.which("java") is not None
    if not java:
        warnings.warn("caption metrics: java not found, METEOR skipped (BLEU, ROUGE-L and CIDEr use a Python "
                      "tokenizer in place of Stanford's PTBTokenizer)", stacklevel=2)
    keys = sorted(references)
    gts = _tokenize({k: list(references[k]) for k in keys}, java)
    res = _tokenize({k: [predictions[k]] for k in keys}, java)
    out: dict[str, float] = {}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    out.update({f"bleu_{n + 1}": float(b) for n, b in enumerate(bleu)})
    if java:
        from pycocoevalcap.meteor.meteor import Meteor

        out["meteor"] = float(Meteor().compute_score(gts, res)[0])
    out["rouge_l"] = float(Rouge().compute_score(gts, res)[0])
    out["cider"] = float(Cider().compute_score(gts, res)[0])
    return out
