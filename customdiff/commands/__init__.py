"""Subcommands of the `customdiff` CLI; each module has `register(subparsers)`."""

from customdiff.commands import base, demo, interop, serve

COMMANDS = [base, demo, interop, serve]
