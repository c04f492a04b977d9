"""The `vlforge` command.

    vlforge train [--nproc N] recipe=clip_demo [overrides]     train a recipe
    vlforge eval [--nproc N] recipe=... checkpoint=...         evaluate a checkpoint with a recipe's task
    vlforge serve MODEL | recipe=... [checkpoint=...]          serve a model over HTTP (OpenAI-compatible)
    vlforge export SOURCE OUT_DIR [--overwrite]                a run's checkpoint as safetensors + config
    vlforge make-shards {caption,vqa,conversation,folder} ...  WebDataset shards from annotations or folders
    vlforge slurm --nodes 4 --gpus-per-node 8 recipe=...       an sbatch script for a recipe
    vlforge recipes [NAME]                                     the recipes, or one recipe's composed config
    vlforge zoo [NAME]                                         the model zoo, or one model's types

Exit codes: the command's own (a training's, an export's), 2 for a request that cannot run (bad
arguments, an unknown recipe or model name), with argparse's usage message rather than a traceback.
"""
from __future__ import annotations

import argparse
import os
import sys

import vlforge
from vlforge.cli import catalog, launching, serve_command
from vlforge.cli.usage import UsageError
from vlforge.datasets import make_shards
from vlforge.hub import export
from vlforge.hub.zoo import model_zoo
from vlforge.launch import slurm

PROG = "vlforge"

# Subcommands whose arguments go, all of them and in order, to another module's own parser (its --help
# included): the module's main and a summary for `vlforge --help`.
PASSTHROUGH = {
    "make-shards": (make_shards.main,
                    "write WebDataset shards from caption / VQA / conversation annotations or an image folder"),
    "slurm": (slurm.main, "write (or --submit) an sbatch script for a recipe"),
}

_JOB_HELP = {
    "train": ("train a recipe", (
        "Train a recipe: `vlforge train recipe=clip_demo [key=value ...]`. Without --nproc the job runs in\n"
        "this process (as `python launch/train.py` does, and as each task of an srun or torchrun job);\n"
        "--nproc N starts N ranks with DeepSpeed's launcher. Every argument that is not an option below\n"
        "goes to Hydra in order: the recipe's overrides and Hydra's flags (`--cfg job` prints the\n"
        "composed config, `-m` sweeps, `--hydra-help`).")),
    "eval": ("evaluate a checkpoint with a recipe's task", (
        "Evaluate a checkpoint: `vlforge eval recipe=blip_caption_demo checkpoint=runs/blip_caption_demo`\n"
        "(a run directory: its newest complete checkpoint; or a checkpoints/step_N directory; or\n"
        "checkpoint=null for the recipe's starting weights). Results go to run_dir (default\n"
        "runs/<name>/eval). Options and Hydra arguments as for `vlforge train`.")),
}


def build_parser(prog: str = PROG) -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    """The command's parser and, by name, its subcommands' parsers."""
    parser = argparse.ArgumentParser(prog=prog, description="Train, evaluate, export and look up vision-language "
                                                            "models built from YAML recipes.",
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="`vlforge COMMAND --help` describes each command.")
    parser.add_argument("--version", action="version", version=f"{prog} {vlforge.__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    subs: dict[str, argparse.ArgumentParser] = {}

    for name, (summary, description) in _JOB_HELP.items():
        required = "recipe=NAME" + (" checkpoint=PATH" if name == "eval" else "")
        sub = subs[name] = commands.add_parser(
            name, help=summary, description=description, allow_abbrev=False,
            usage=f"%(prog)s [-h] [--nproc N] [--master-port PORT] [--verbose] {required} [key=value ...]",
            formatter_class=argparse.RawDescriptionHelpFormatter)
        launching.add_arguments(sub)

    sub = subs["serve"] = commands.add_parser(
        "serve", help="serve a model over HTTP (OpenAI-compatible chat, task endpoints, streaming)",
        description=serve_command.DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    serve_command.add_arguments(sub)

    sub = subs["export"] = commands.add_parser(
        "export", help="export a run's checkpoint as a self-contained model directory",
        description="Export a run's newest complete checkpoint (any ZeRO stage, any world size), or a "
                    "checkpoints/step_N directory, as a directory that loads anywhere: model.safetensors (the "
                    "consolidated fp32 weights), config.yaml (the run's composed recipe), tokenizer/ and "
                    "export.json. vlforge.load_model(name, model_type, checkpoint=OUT_DIR) builds the model from it.")
    sub.add_argument("source", metavar="SOURCE", help="a run directory, or a checkpoints/step_N directory")
    sub.add_argument("out_dir", metavar="OUT_DIR", help="the directory to write (must not exist, or be empty)")
    sub.add_argument("--overwrite", action="store_true", help="replace OUT_DIR if it exists")

    for name, (_, summary) in PASSTHROUGH.items():
        subs[name] = commands.add_parser(name, help=summary, add_help=False)

    sub = subs["recipes"] = commands.add_parser(
        "recipes", help="list the recipes, or print one's composed config",
        description="Without NAME: every recipe and what it trains. With NAME: the config `vlforge train "
                    "recipe=NAME [overrides]` runs with, as YAML.")
    sub.add_argument("name", metavar="NAME", nargs="?", help="a recipe (recipes/recipe/NAME.yaml)")
    sub.add_argument("overrides", metavar="OVERRIDE", nargs="*", help="key=value overrides of the recipe")
    sub.add_argument("--resolve", action="store_true", help="resolve interpolations such as ${name}")

    sub = subs["zoo"] = commands.add_parser(
        "zoo", help="the model zoo: the models vlforge.load_model loads",
        description="Without NAME: every (name, model type) of the zoo and where its weights come from. "
                    "With NAME: that model's types and the recipes that build them.")
    sub.add_argument("name", metavar="NAME", nargs="?", help="a model name of the zoo, e.g. blip_caption")
    return parser, subs


def main(argv: list[str] | None = None) -> int:
    """Run the command line `argv` (default: sys.argv[1:]) and return the exit status."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser, subs = build_parser()
    try:
        return _dispatch(parser, subs, argv)
    except SystemExit as exit_:  # argparse's --help, --version and usage errors
        return launching.exit_code(exit_)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # the reader of stdout went away (`vlforge recipes | head -3`)
        # Python flushes stdout again at exit: point it at /dev/null so that it does not fail once more.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


def _dispatch(parser: argparse.ArgumentParser, subs: dict[str, argparse.ArgumentParser], argv: list[str]) -> int:
    if argv and argv[0] in PASSTHROUGH:
        return _passthrough(argv[0], argv[1:])
    if argv and argv[0].startswith("-") and argv[0] not in ("-h", "--help", "--version"):
        parser.error(f"unrecognized arguments: {argv[0]} (options go after the command)")
    # Unknown arguments are kept in their order: Hydra's, for train and eval.
    args, extras = parser.parse_known_args(argv)
    sub = subs[args.command]
    if extras and args.command not in launching.COMMANDS:
        sub.error(f"unrecognized arguments: {' '.join(extras)}")
    try:
        if args.command in launching.COMMANDS:
            return launching.run_job(launching.COMMANDS[args.command], args, extras, PROG)
        if args.command == "serve":
            return serve_command.run(args)
        if args.command == "export":
            return export.main([args.source, args.out_dir, *(["--overwrite"] if args.overwrite else [])])
        if args.command == "recipes":
            text = (catalog.list_recipes() if args.name is None
                    else catalog.describe_recipe(args.name, args.overrides, args.resolve))
            print(text.rstrip("\n"))
            return 0
        if args.command == "zoo":
            print(model_zoo if args.name is None else catalog.describe_model(args.name))
            return 0
    except UsageError as err:
        sub.error(str(err))
    raise AssertionError(f"no handler for {args.command}")  # every subparser has a branch above


def _passthrough(command: str, argv: list[str]) -> int:
    module_main, _ = PASSTHROUGH[command]
    return module_main(argv, prog=f"{PROG} {command}")


if __name__ == "__main__":
    sys.exit(main())
