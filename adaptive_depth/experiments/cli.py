"""The ``adaptive-depth`` command (also ``python -m adaptive_depth``).

Subcommands live in their own modules, each with ``add_arguments(parser)`` and ``run(args) -> int``.
"""
from __future__ import annotations

import argparse
import importlib
import sys
from typing import Optional, Sequence

COMMANDS = {
    "demo": ("adaptive_depth.experiments.demo", "train uniform vs adaptive steps on an embedded task (the main job)"),
    "wrap-demo": ("adaptive_depth.experiments.wrap_demo",
                  "wrap a torchvision resnet18 and train it, uniform vs adaptive"),
    "paper": ("adaptive_depth.experiments.paper", "reproduce the paper's figures (fig1, fig2)"),
    "grow": ("adaptive_depth.experiments.growth", "training time: grow the depth during training vs full depth"),
    "bench": ("adaptive_depth.experiments.bench", "uniform vs adaptive steps over Lt, rules and seeds (JSON out)"),
    "realdata": ("adaptive_depth.experiments.realdata", "MNIST-1D and digits: plain vs uniform vs adaptive, 5 seeds"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="adaptive-depth",
                                     description="Leaky ResNets with adaptive per-layer step sizes.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module_name, help_text) in COMMANDS.items():
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as err:
            if err.name != module_name:
                raise
            continue
        p = sub.add_parser(name, help=help_text, description=help_text,
                           formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "_run", None) is None:
        parser.print_help()
        return 2
    return int(args._run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
