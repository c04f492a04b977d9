import re
from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).resolve().parent
# One version, vlforge.__version__, read as text: importing vlforge here would need its dependencies.
VERSION = re.search(r'^__version__ = "([^"]+)"$', (HERE / "vlforge" / "__init__.py").read_text(encoding="utf-8"),
                    re.MULTILINE).group(1)

setup(
    name="vlforge",
    version=VERSION,
    description="Distributed training of vision-language models from YAML recipes (DeepSpeed, Hydra, WebDataset).",
    long_description=(HERE / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="BSD-3-Clause",
    python_requires=">=3.10",
    packages=find_packages(include=["vlforge", "vlforge.*"]) + ["vlforge.recipes"],
    # The Hydra recipe tree lives at the repo top as recipes/ and ships inside the wheel as vlforge.recipes,
    # every YAML file at any depth (hydra/launcher/ is two folders down); its folders, without an
    # __init__.py, import as namespace packages (importlib.resources reads them).
    package_dir={"vlforge.recipes": "recipes"},
    package_data={"vlforge": ["py.typed"], "vlforge.serve": ["page/*"], "vlforge.recipes": ["**/*.yaml"]},
    entry_points={"console_scripts": ["vlforge=vlforge.cli.main:main"]},
    install_requires=[
        "torch>=2.2",
        "torchvision>=0.17",
        "deepspeed>=0.14",
        "transformers>=4.40",
        "timm>=1.0",
        "hydra-core>=1.3",
        "omegaconf>=2.3",
        "webdataset>=0.2.86",
        "braceexpand>=0.1.7",
        "wandb>=0.16",
        "huggingface_hub>=0.23",  # zoo weights and tokenizers (vlforge.hub.sources)
        "tokenizers>=0.15",
        "safetensors>=0.4",
        "pycocoevalcap>=1.2",  # COCO caption metrics (BLEU, METEOR, ROUGE-L, CIDEr); METEOR needs Java
        "pillow>=10.0",
        "torchcodec>=0.16",  # JPEG straight to a tensor in the loader (PIL where its library does not load)
        "numpy>=1.24",
        "tqdm>=4.66",
        # `vlforge serve`: the HTTP server (light, pure Python); Ray Serve replicas are the `ray` extra
        "fastapi>=0.110",
        "uvicorn>=0.29",
        "prometheus_client>=0.20",
    ],
    extras_require={
        "dev": ["pytest>=7.4", "pytest-timeout>=2.2", "open_clip_torch>=2.24",  # open_clip: parity tests
                "hydra-submitit-launcher>=1.2",  # the SLURM tests launch through submitit too
                "peft>=0.10", "bitsandbytes>=0.46", "accelerate>=0.30",  # LoRA and 4-bit tests
                "import-linter>=2.0",  # the layers contract (tests/test_layers.py; grimp comes with it)
                "ruff>=0.4",  # undefined names and import order (tests/test_lint.py)
                "setuptools>=70.1",  # builds the wheel without the separate `wheel` package (tests/cli/test_wheel.py)
                "openai>=1.30", "httpx>=0.27", "schemathesis>=3.30", "hypothesis>=6.100",  # serving tests
                "playwright>=1.40",  # the page at / in Debian's chromium (tests/serve/test_page.py)
                "ray[serve]>=2.60", "psutil>=5.9",  # serve.replicas (tests/e2e/test_serve_replicas.py)
                "torchao>=0.14"],  # load_model(quant="int8") (tests/hub/test_low_precision.py)
        "slurm": ["hydra-submitit-launcher>=1.2"],  # hydra/launcher=vlforge_slurm
        "lora": ["peft>=0.10"],  # model.lora (LLaVA finetuning with LoRA adapters)
        "quant": ["bitsandbytes>=0.46", "accelerate>=0.30",  # model.load_4bit / load_8bit, quant="nf4"
                  "torchao>=0.14"],  # quant="int8"
        "ray": ["ray[serve]>=2.60"],  # vlforge serve ... serve.replicas=N (Ray Serve)
    },
)
