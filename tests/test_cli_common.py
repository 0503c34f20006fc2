"""The three commands share one error handling and list every fixed set of values in --help."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import pytest

from cloud_agent.cli import build_parser as cloud_parser
from cloud_agent.cli import main as cloud_main
from edge_agent.cli import build_parser as edge_parser
from edge_agent.cli import main as edge_main
from sim.cli import build_parser as sim_parser
from sim.cli import main as sim_main

Main = Callable[[Sequence[str] | None], int]


@pytest.mark.parametrize(("main", "argv"), [
    (edge_main, ["run", "--protocol", "4"]),
    (cloud_main, ["run", "--format", "xml"]),
    (sim_main, ["run", "herding", "--mode", "fast"]),
])
def test_usage_error_is_one_line_and_exit_2(main: Main, argv: list[str],
                                            capsys: pytest.CaptureFixture[str]) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "error: " in err and "invalid choice" in err


def _help(parser: Callable[[], object], command: str) -> str:
    root = parser()
    actions = root._subparsers._group_actions[0].choices  # type: ignore[attr-defined]
    text: str = actions[command].format_help()
    return " ".join(text.split())


@pytest.mark.parametrize(("parser", "command", "expected"), [
    (edge_parser, "run", ["{3.1.1,5}", "{cbor,json}", "{debug,info,warning,error}",
                          "local, remote, random, min_rtt, threshold, p2c, ect"]),
    (cloud_parser, "run", ["{3.1.1,5}", "{cbor,json}", "{debug,info,warning,error}"]),
    (sim_parser, "run", ["{emulate,des}", "{3.1.1,5}"]),
])
def test_help_lists_the_values_of_every_enumerated_option(parser: Callable[[], object], command: str,
                                                          expected: list[str]) -> None:
    text = _help(parser, command)
    for values in expected:
        assert values in text
