"""Cold start: a fresh process loading BLIP-base (224M parameters, saved as transformers saves it) and
captioning one 384 px image, vlforge's `load_model` against transformers' `from_pretrained` +
`generate`, each in its own new Python process, alternating, median of the repeats. Prints the seconds
from the imports done to the first caption, and the peak resident memory above what the process held
after its imports, against the weights' bytes.

    python benchmarks/cold_start.py [--repeats 3] [--quant none|int8|bf16]

Targets (issue 21): <= 0.5x transformers' time; peak memory <= 1.2x the weights' bytes.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment  # noqa: E402

NEW_TOKENS = 20

# Each child prints one JSON line: seconds from after its imports to the first caption, resident
# memory (MiB) after the imports and at its peak.
CHILD = r"""
import json, resource, sys, time
import torch
torch.set_flush_denormal(True)
from transformers import BlipForConditionalGeneration
from vlforge.hub.load import load_model  # each library imported before the clock starts
directory, who, quant = sys.argv[1], sys.argv[2], sys.argv[3]

def rss_mib():
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS")) / 1024

base = rss_mib()
image = torch.randint(0, 256, (1, 3, 384, 384), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
start = time.perf_counter()
with torch.no_grad():
    if who == "vlforge":
        model = load_model("blip_caption", "base_coco", checkpoint=directory, quant=None if quant == "none" else quant)
        caption = model.generate({"image": image}, num_beams=1, max_length=TOTAL, min_length=TOTAL)[0]
    else:
        model = BlipForConditionalGeneration.from_pretrained(directory).eval()
        pixels = image.float() / 255  # (normalisation is not what is timed)
        ids = model.generate(pixel_values=pixels, max_new_tokens=NEW, min_new_tokens=NEW)
        caption = str(ids.tolist())
seconds = time.perf_counter() - start
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({"seconds": seconds, "base_mib": base, "peak_mib": peak, "caption": caption[:40]}))
""".replace("TOTAL", str(4 + NEW_TOKENS)).replace("NEW", str(NEW_TOKENS))


def save_model(directory: Path) -> int:
    """BLIP-base with random weights and a BERT-sized WordPiece vocabulary, as a hub snapshot holds
    them; returns the weights' bytes."""
    import torch
    from transformers import BlipConfig, BlipForConditionalGeneration

    from vlforge.datasets.demo_tokenizer import SPECIAL_TOKENS, save_vocab_tokenizer

    torch.manual_seed(0)
    model = BlipForConditionalGeneration(BlipConfig())
    model.save_pretrained(str(directory))
    vocab_size = model.config.text_config.vocab_size
    words = ["a", "picture", "of"]
    tokens = list(SPECIAL_TOKENS) + words
    tokens += [f"w{i}" for i in range(vocab_size - len(tokens))]
    save_vocab_tokenizer(tokens, directory)
    (directory / "vocab.txt").write_text("\n".join(tokens) + "\n")
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


def run_child(directory: Path, who: str, quant: str) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, str(directory), who, quant], check=True, capture_output=True,
                         text=True, env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "HOME": str(Path.home())})
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quant", choices=("none", "int8", "bf16"), default="none")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp) / "blip-base"
        weights = save_model(directory) / 2 ** 20
        runs: dict[str, list[dict]] = {"vlforge": [], "transformers": []}
        for repeat in range(args.repeats):
            for who in (("vlforge", "transformers") if repeat % 2 == 0 else ("transformers", "vlforge")):
                runs[who].append(run_child(directory, who, args.quant))
    print(f"# Cold start, BLIP-base from a saved snapshot to the first caption ({NEW_TOKENS} tokens), vlforge quant "
          f"{args.quant} ({environment()}); weights {weights:.0f} MiB\n")
    print("| run | seconds (median) | ratio | peak MiB above the imports | x the weights |")
    print("|---|---|---|---|---|")
    peer = statistics.median(r["seconds"] for r in runs["transformers"])
    for who, rows in runs.items():
        seconds = statistics.median(r["seconds"] for r in rows)
        above = max(r["peak_mib"] - r["base_mib"] for r in rows)
        print(f"| {who} | {seconds:.2f} | **{seconds / peer:.2f}x** | {above:.0f} | **{above / weights:.2f}x** |")


if __name__ == "__main__":
    main()
