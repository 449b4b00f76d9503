"""Every subcommand explains itself with --help, and errors are one clear line."""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest

from app.cli import build_parser


def _subcommands() -> list[str]:
    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sorted(action.choices)


def test_there_are_subcommands() -> None:
    assert {"stack", "demo"} <= set(_subcommands())


@pytest.mark.parametrize("command", _subcommands())
def test_every_subcommand_has_help(command: str) -> None:
    done = subprocess.run([sys.executable, "-m", "app.cli", command, "--help"], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"usage: postback {command}")
    assert len(done.stdout.splitlines()) > 3


def test_unknown_action_is_a_usage_error() -> None:
    done = subprocess.run([sys.executable, "-m", "app.cli", "stack", "sideways"], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 2
    assert "invalid choice" in done.stderr
