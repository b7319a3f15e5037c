"""The ``fedstudy`` command.

The shared core imports none of the components: the component commands are looked up by
module name when they are run, so ``fedstudy validate`` needs neither PyTorch nor gRPC servers.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from fedstudy import __version__

# Subcommands that live in a component: name -> (module, function, one-line help).
COMPONENT_COMMANDS: dict[str, tuple[str, str, str]] = {
    "aggregator": ("fedstudy_aggregator.main", "main", "run a study's aggregator (gRPC server)"),
    "trainer": ("fedstudy_trainer.main", "main", "run one site's trainer (dials out)"),
}


def _component(name: str) -> Callable[[Sequence[str]], int]:
    module, func, _ = COMPONENT_COMMANDS[name]
    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as e:
        extra = " (pip install 'fedstudy[trainer]')" if name == "trainer" else ""
        raise SystemExit(f"fedstudy {name}: cannot import {e.name}{extra}") from None
    fn: Callable[[Sequence[str]], int] = getattr(mod, func)
    return fn


def _cmd_validate(args: argparse.Namespace) -> int:
    from fedstudy.spec import StudyError, check_local_files, load_study

    status = 0
    for path in args.study:
        try:
            study = load_study(path)
            if not args.no_files:
                check_local_files(study, Path(path).resolve().parent)
        except StudyError as e:
            print(f"{path}: invalid", file=sys.stderr)
            for p in e.problems:
                print(f"  {p}", file=sys.stderr)
            status = 1
            continue
        s = study.spec
        print(
            f"{path}: valid: study {study.name}, {len(s.sites)} sites, {s.rounds} rounds, "
            f"{s.strategy.name}, model {s.model.name}"
        )
    return status


def _cmd_run(args: argparse.Namespace) -> int:
    from fedstudy.local import run_study

    return run_study(
        Path(args.study),
        out=Path(args.out) if args.out else None,
        progress=args.progress,
        keep_state=args.keep_state,
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fedstudy", description="Federated learning studies across hospitals."
    )
    parser.add_argument("--version", action="version", version=f"fedstudy {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("validate", help="check study files and say what is wrong")
    p.add_argument("study", nargs="+", help="study file(s), YAML")
    p.add_argument(
        "--no-files",
        action="store_true",
        help="do not check that the sites' data files exist on this machine",
    )
    p.set_defaults(func=_cmd_validate)

    p = sub.add_parser("run", help="run a whole study on this machine")
    p.add_argument("study", help="study file, YAML")
    p.add_argument("--out", help="output folder (default: fedstudy-out/<study name>)")
    p.add_argument(
        "--progress",
        choices=["auto", "live", "plain"],
        default="auto",
        help="live display in a terminal, plain lines otherwise (default: auto)",
    )
    p.add_argument(
        "--keep-state",
        action="store_true",
        help="resume from the output folder's state instead of starting afresh",
    )
    p.set_defaults(func=_cmd_run)

    for name, (_, _, help_text) in COMPONENT_COMMANDS.items():
        p = sub.add_parser(name, help=help_text, add_help=False)
        p.add_argument("args", nargs=argparse.REMAINDER)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in COMPONENT_COMMANDS:
        return _component(argv[0])(argv[1:])
    args = build_parser().parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    return func(args)
