"""Serve a model over HTTP: `python launch/serve.py blip_caption:base_coco` or `python launch/serve.py
recipe=blip_caption_demo checkpoint=runs/blip_caption_demo serve.port=8000` (what `vlforge serve` runs)."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from vlforge.cli.main import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["serve", *sys.argv[1:]]))
