"""A CLI command: a name, a help line, the argument groups it is assembled from, and ``run``. A
group of commands (``flarc latency profile|show``) is a :class:`CommandGroup`."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from flarc.cli.args import ArgGroup


class Command:
    """One ``flarc`` command; subclasses set ``name``, ``help`` and ``groups`` and implement
    :meth:`run`, and may add flags of their own in :meth:`add_arguments`."""

    name = ""
    help = ""
    groups: Sequence[ArgGroup] = ()

    def register(self, subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
        """Add this command's parser to ``subparsers``."""
        parser = subparsers.add_parser(self.name, help=self.help, description=self.help)
        for group in self.groups:  # first: a group's positional comes before the command's own
            group.add(parser)
        self.add_arguments(parser)
        parser.set_defaults(func=self.run, own_process=self.own_process)
        return parser

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        """Flags only this command has (positionals first)."""

    def own_process(self, args: argparse.Namespace) -> None:
        """Process-wide settings the command wants when it is the program (``flarc`` calls this
        before :meth:`run`; a caller of ``run`` in its own process does not)."""

    def run(self, args: argparse.Namespace) -> int:
        """Do the work; raise FlarcError for bad input; return the exit code."""
        raise NotImplementedError


class CommandGroup(Command):
    """``flarc NAME SUB ...``: a command whose sub-commands are commands."""

    def __init__(self, name: str, help: str, commands: Sequence[Command]) -> None:
        self.name = name
        self.help = help
        self.commands = list(commands)

    def register(self, subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
        """Add the group's parser and each sub-command under it."""
        parser = subparsers.add_parser(self.name, help=self.help, description=self.help)
        sub = parser.add_subparsers(dest=f"{self.name}_command", required=True, metavar="COMMAND")
        for command in self.commands:
            command.register(sub)
        return parser
