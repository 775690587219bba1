"""The command table: every subcommand the parser knows has exactly one handler."""

from facecls.cli import COMMANDS, build_parser


def test_every_subcommand_has_a_handler() -> None:
    parser = build_parser()
    subcommands = next(a for a in parser._subparsers._group_actions if a.dest == "command")
    assert set(subcommands.choices) == set(COMMANDS)
