"""The `customdiff` command: one argparse subcommand per module in `customdiff.commands`."""

from __future__ import annotations

import argparse
import logging
import sys

from concepts.errors import CustomDiffError
from customdiff.commands import COMMANDS

DESCRIPTION = """\
customdiff runs Custom Diffusion (Kumari et al., CVPR 2023) as a service: one shared Stable Diffusion
base learns many users' concepts from a few photos each, merges and compresses them, and serves
them all at once from one model. Each command below works on local files; `serve` runs the same
operations as gRPC services."""

# The help's command groups, in order; a registered command missing here is listed under "other".
GROUPS = (
    ("the service", ("serve", "triton", "remote", "demo")),
    ("make concepts", ("train", "merge", "compress", "import", "export")),
    ("use concepts", ("generate", "eval")),
    ("bases and deployment", ("base", "export-onnx")),
)

EPILOG = """\
Run `customdiff COMMAND --help` for a command's options. Documentation (in the source tree):
  README.md               what customdiff is, quick start (`make demo`, `make test`)
  docs/job-spec.md        training: job spec, defaults, progress events, `customdiff train`
  docs/merge.md           closed-form merge and SVD compression
  docs/deploy.md          Triton, ONNX export, Kubernetes (Helm)
  docs/configuration.md   service settings
  docs/operations.md      running the services: resume, metrics, troubleshooting
  docs/toyworld.md        the toy-world evaluation (`customdiff eval toyworld`)
Progress bars show on a terminal only; CUSTOMDIFF_PROGRESS=1 forces them on, 0 off."""


def package_version() -> str:
    """The installed distribution's version, or "unknown" when customdiff runs from a plain checkout."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("customdiff")
    except PackageNotFoundError:
        return "unknown"


def _command_list(sub: argparse._SubParsersAction) -> str:
    """The registered commands with their one-line help, grouped as `GROUPS` says."""
    helps = dict.fromkeys(sub.choices, "")
    helps.update({action.dest: action.help or "" for action in sub._choices_actions})
    grouped = [(title, [n for n in names if n in helps]) for title, names in GROUPS]
    listed = {n for _, names in grouped for n in names}
    grouped.append(("other", [n for n in helps if n not in listed]))
    width = max(map(len, helps), default=0) + 2
    lines = []
    for title, names in grouped:
        if names:
            lines.append(f"{title}:")
            lines += [f"  {name:<{width}}{helps[name]}" for name in names]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="customdiff", usage="%(prog)s [-h] [-v] [--version] COMMAND ...",
                                     epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true", help="log at DEBUG level")
    parser.add_argument("--version", action="version", version=f"customdiff {package_version()}")
    # The commands are listed (grouped) in the description, so argparse's own flat list is suppressed.
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", help=argparse.SUPPRESS)
    for command in COMMANDS:
        command.register(sub)
    parser.description = f"{DESCRIPTION}\n\ncommands:\n{_indent(_command_list(sub))}"
    return parser


def _indent(text: str) -> str:
    return "\n".join(f"  {line}" for line in text.splitlines())


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.run(args) or 0)
    except CustomDiffError as e:
        print(f"customdiff {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
