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
    "operator": ("fedstudy_operator.main", "main", "run the Kubernetes operator"),
    "export": (
        "fedstudy_trainer.export",
        "main",
        "export a study's model to ONNX and check it against PyTorch",
    ),
    "predict": (
        "fedstudy_trainer.predict",
        "main",
        "score a CSV table with an exported model and a site's preprocessing",
    ),
}
# The extras a component command needs, named when one of its imports is missing.
COMPONENT_EXTRAS = {"trainer": "trainer", "export": "trainer,export", "predict": "trainer,export"}


def _component(name: str) -> Callable[[Sequence[str]], int]:
    module, func, _ = COMPONENT_COMMANDS[name]
    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as e:
        extra = (
            f" (pip install 'fedstudy[{COMPONENT_EXTRAS[name]}]')"
            if name in COMPONENT_EXTRAS
            else ""
        )
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
    from fedstudy.launch import Launcher

    # The fork server of the trainers starts first: its imports take seconds, and overlap
    # the engine's own, the checks of the study and the aggregator's start.
    launcher = Launcher(forked=not args.isolated_processes)
    launcher.warm()
    try:
        from fedstudy.local import run_study

        return run_study(
            Path(args.study),
            out=Path(args.out) if args.out else None,
            progress=args.progress,
            keep_state=args.keep_state,
            launcher=launcher,
        )
    finally:
        launcher.close()


def _cmd_report(args: argparse.Namespace) -> int:
    from fedstudy.report import ReportError, epsilon_budget_of, write_report
    from fedstudy.spec import StudyError, load_study

    metric, budget = args.metric, None
    if args.study:
        try:
            study = load_study(args.study)
        except StudyError as e:
            print(f"fedstudy report: {args.study}: invalid study", file=sys.stderr)
            for p in e.problems:
                print(f"  {p}", file=sys.stderr)
            return 2
        metric = metric or study.spec.task.metric
        budget = epsilon_budget_of(study.spec)
    try:
        path = write_report(Path(args.out_dir), metric=metric, epsilon_budget=budget)
    except ReportError as e:
        print(f"fedstudy report: {e}", file=sys.stderr)
        return 1
    print(f"report: {path}")
    return 0


def _cmd_audit_verify(args: argparse.Namespace) -> int:
    from fedstudy.audit import verify

    path = Path(args.file)
    try:
        verdict = verify(path, head=args.head)
    except OSError as e:
        print(f"fedstudy audit verify: {path}: cannot read: {e.strerror}", file=sys.stderr)
        return 2
    if verdict.problem is not None:
        print(f"{path}: broken at {verdict.problem}", file=sys.stderr)
        return 1
    print(
        f"{path}: ok: {verdict.entries} entries, the chain verifies; last entry "
        f"{verdict.last_event or '-'}, hash {verdict.head}"
    )
    return 0


def _cmd_certs_init(args: argparse.Namespace) -> int:
    from fedstudy.certs import init_ca_dir

    try:
        d = init_ca_dir(args.study, Path(args.dir), days=args.days, force=args.force)
    except FileExistsError as e:
        print(f"fedstudy certs init: {e}", file=sys.stderr)
        return 1
    print(f"CA for study {args.study}: {d / 'ca.crt'} (key {d / 'ca.key'}, keep it private)")
    return 0


def _cmd_certs_issue(args: argparse.Namespace) -> int:
    from fedstudy.certs import CA_CERT, CA_KEY, issue_cert, secret_manifest, write_credentials

    ca_dir = Path(args.dir)
    try:
        ca_cert, ca_key = (ca_dir / CA_CERT).read_bytes(), (ca_dir / CA_KEY).read_bytes()
    except FileNotFoundError as e:
        print(
            f"fedstudy certs issue: no CA at {e.filename}: run fedstudy certs init first",
            file=sys.stderr,
        )
        return 1
    creds = issue_cert(
        args.name, ca_cert, ca_key, server=args.server, hosts=args.host, days=args.days
    )
    out = Path(args.out) if args.out else ca_dir / args.name
    write_credentials(creds, out, args.name)
    print(f"certificate for {args.name}: {out / (args.name + '.crt')}", file=sys.stderr)
    if args.secret:
        default = f"{args.study}-{args.name}-tls" if args.study else f"{args.name}-tls"
        print(secret_manifest(creds, args.secret_name or default, args.namespace), end="")
    return 0


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
    p.add_argument(
        "--isolated-processes",
        action="store_true",
        help="start every trainer and the export as a fresh Python process, as in a pod "
        "(slower: each imports PyTorch on its own; by default they are forked from one "
        "process that imported it once)",
    )
    p.set_defaults(func=_cmd_run)

    p = sub.add_parser("report", help="write a study's report.md and plots from its outputs")
    p.add_argument("out_dir", metavar="OUT_DIR", help="the study's output folder (fedstudy run)")
    p.add_argument("--metric", help="the metric to plot (default: the study's, or auc/accuracy)")
    p.add_argument("--study", help="the study file: its metric and privacy budget (optional)")
    p.set_defaults(func=_cmd_report)

    audit = sub.add_parser("audit", help="check a study's audit trail (audit.jsonl)")
    asub = audit.add_subparsers(dest="audit_command", metavar="ACTION", required=True)
    p = asub.add_parser(
        "verify",
        help="check the hash chain; exit 0 when it verifies, 1 naming the first bad entry",
    )
    p.add_argument("file", metavar="FILE", help="the audit trail, e.g. OUT/audit.jsonl")
    p.add_argument(
        "--head",
        metavar="SHA256",
        help="also require an entry with this hash (e.g. summary.json's audit.study_end_hash), "
        "so a trail cut short after it fails",
    )
    p.set_defaults(func=_cmd_audit_verify)

    certs = sub.add_parser("certs", help="a CA per study, certificates for sites and aggregator")
    csub = certs.add_subparsers(dest="certs_command", metavar="ACTION", required=True)
    p = csub.add_parser("init", help="create the study's certificate authority")
    p.add_argument("--study", required=True, help="the study's name")
    p.add_argument("--dir", default="certs", help="where ca.crt and ca.key go (default: certs)")
    p.add_argument("--days", type=int, default=730, help="validity (default: 730)")
    p.add_argument("--force", action="store_true", help="replace an existing CA")
    p.set_defaults(func=_cmd_certs_init)
    p = csub.add_parser("issue", help="issue a site's (or the aggregator's) certificate")
    p.add_argument("name", help="the site's name as in the study (or 'aggregator' with --server)")
    p.add_argument("--dir", default="certs", help="the CA's folder (default: certs)")
    p.add_argument("--out", help="where the certificate goes (default: <dir>/<name>)")
    p.add_argument("--server", action="store_true", help="a server certificate (aggregator)")
    p.add_argument(
        "--host",
        action="append",
        default=[],
        help="a DNS name or IP address clients dial (server; repeatable)",
    )
    p.add_argument("--days", type=int, default=365, help="validity (default: 365)")
    p.add_argument(
        "--secret",
        action="store_true",
        help="also print a Kubernetes Secret manifest (type kubernetes.io/tls)",
    )
    p.add_argument("--study", help="the study's name, for the Secret's name <study>-<name>-tls")
    p.add_argument("--secret-name", help="the Secret's name (overrides the default)")
    p.add_argument("--namespace", help="the Secret's namespace")
    p.set_defaults(func=_cmd_certs_issue)

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
