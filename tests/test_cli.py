"""The command table: every subcommand the parser knows has exactly one handler."""

from facecls.cli import COMMANDS, build_parser


def test_every_subcommand_has_a_handler() -> None:
    parser = build_parser()
    subcommands = next(a for a in parser._subparsers._group_actions if a.dest == "command")
    assert set(subcommands.choices) == set(COMMANDS)


def test_train_help_names_every_bundled_recipe() -> None:
    shown = " ".join(_help("train").split())
    for name in ("resnet50", "mobilenet_v2", "inception_resnet_v1", "sface", "sface_knn", "sface_ncm"):
        assert name in shown


def _help(command: str) -> str:
    parser = build_parser()
    subcommands = next(a for a in parser._subparsers._group_actions if a.dest == "command")
    return subcommands.choices[command].format_help()
