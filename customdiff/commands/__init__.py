"""Subcommands of the `customdiff` CLI; each module has `register(subparsers)`."""

from customdiff.commands import base, demo

COMMANDS = [base, demo]
