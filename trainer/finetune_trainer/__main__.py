"""`python -m finetune_trainer --config FILE`: see finetune_trainer.entrypoint."""

from __future__ import annotations

import argparse
import sys

from .entrypoint import run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m finetune_trainer", description="LoRA fine-tuning under DDP.")
    parser.add_argument("--config", required=True, help="trainer config file (YAML or JSON, camelCase keys)")
    args = parser.parse_args(argv)
    return run(args.config)


if __name__ == "__main__":
    sys.exit(main())
