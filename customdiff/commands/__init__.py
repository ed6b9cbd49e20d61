"""Subcommands of the `customdiff` CLI; each module has `register(subparsers)`."""

from customdiff.commands import base, demo, eval, export_onnx, generate, interop, merge, remote, serve, train, triton

COMMANDS = [base, demo, interop, serve, remote, merge, generate, triton, train, eval, export_onnx]
