"""``python -m videolavit``: LightningCLI for training plus the project's own subcommands."""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from videolavit import __version__
from videolavit.commands import COMMANDS
from videolavit.commands.user_errors import UsageError, fail
from videolavit.dependencies import DependencyError, check_dependencies

SKIP_DEPENDENCY_CHECK = "VIDEOLAVIT_SKIP_DEPENDENCY_CHECK"

TRAINER_COMMANDS = {
    "fit": "train a stage from a YAML config (--config experiments/...yaml)",
    "validate": "run a stage's validation loop",
    "test": "run a stage's test loop",
    "predict": "run a stage's predict loop (e.g. dump token ids)",
}


def _print_help() -> None:
    print("usage: python -m videolavit <command> [options]   (--version: the installed version)\n")
    print("training (LightningCLI; see `python -m videolavit fit --help`):")
    for name, text in TRAINER_COMMANDS.items():
        print(f"  {name:<10} {text}")
    if COMMANDS:
        print("\ntools:")
        for name, module in COMMANDS.items():
            print(f"  {name:<10} {importlib.import_module(module).HELP}")


def run_command(name: str, argv: list[str]) -> int:
    module = importlib.import_module(COMMANDS[name])
    parser = argparse.ArgumentParser(prog=f"python -m videolavit {name}", description=module.HELP)
    module.add_arguments(parser)
    try:
        return int(module.run(parser.parse_args(argv)) or 0)
    except UsageError as error:  # commands report their own; one that escapes is still one line, exit 2
        return fail(error)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        _print_help()
        return 0
    if argv[0] in ("-V", "--version"):
        print(f"videolavit {__version__}")
        return 0
    if not os.environ.get(SKIP_DEPENDENCY_CHECK):
        try:
            check_dependencies()
        except DependencyError as error:
            print(f"error: {error} (or set {SKIP_DEPENDENCY_CHECK}=1 to run anyway)", file=sys.stderr)
            return 2
    if argv[0] in COMMANDS:
        return run_command(argv[0], argv[1:])
    if argv[0] not in TRAINER_COMMANDS:
        _print_help()
        print(f"\nerror: unknown command {argv[0]!r}", file=sys.stderr)
        return 2
    from videolavit.cli import run_lightning_cli

    run_lightning_cli(argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
