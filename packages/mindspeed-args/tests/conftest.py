"""Shared fixtures: the schema, and running the CLI in-process."""

from __future__ import annotations

import pytest

from mindspeed_args.cli import main
from mindspeed_args.schema import load_schema


@pytest.fixture(scope="session")
def schema():
    return load_schema()


@pytest.fixture
def run_cli(capsys):
    """run_cli(*argv) -> (exit code, stdout, stderr) of `mindspeed args ...`."""

    def run(*argv: str):
        code = main(list(argv))
        out = capsys.readouterr()
        return code, out.out, out.err

    return run
