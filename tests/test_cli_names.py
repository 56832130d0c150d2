"""One meaning per CLI option name across commands, --version, flags without a value in --help, and the
old spellings still working with a deprecation note."""
from __future__ import annotations

from pathlib import Path

import pytest
from typer.main import get_command
from typer.testing import CliRunner

import spairstore
from spairstore.cli import app

COMMANDS = sorted(get_command(app).commands)  # type: ignore[attr-defined]


def invoke(*args: str | Path) -> object:
    return CliRunner().invoke(app, [str(a) for a in args], env={"COLUMNS": "200"})


def test_version() -> None:
    res = invoke("--version")
    assert res.exit_code == 0 and res.stdout.strip() == f"spairstore {spairstore.__version__}"


@pytest.mark.parametrize("command", COMMANDS)
def test_help_shows_flags_without_a_value(command: str) -> None:
    res = invoke(command, "--help")
    assert res.exit_code == 0 and "<bool>" not in res.stdout and "--help" in res.stdout


def test_each_option_name_means_one_thing() -> None:
    """--format is the container format (pack, convert); a dataset root is --source (bench, verify)."""
    meaning: dict[str, set[str]] = {}
    for name, cmd in get_command(app).commands.items():  # type: ignore[attr-defined]
        for p in cmd.params:
            for opt in p.opts:
                if opt in ("--format", "--source") and not p.hidden:
                    meaning.setdefault(opt, set()).add(name)
    assert meaning == {"--format": {"pack", "convert"}, "--source": {"bench", "verify"}}


def test_old_spellings_work_with_a_deprecation_note(synth_store: Path, synth_root: Path) -> None:
    new = invoke("eval", synth_store, "--method", "identity", "--report", "csv")
    old = invoke("eval", synth_store, "--method", "identity", "--format", "csv")
    assert new.exit_code == old.exit_code == 0 and new.stdout == old.stdout and new.stdout.startswith("section,group,level,alpha")
    assert "eval --format is deprecated here; use --report" in old.stderr and not new.stderr
    new, old = invoke("stats", synth_store, "--report", "markdown"), invoke("stats", synth_store, "--markdown")
    assert new.stdout == old.stdout and "|" in new.stdout and "use --report markdown" in old.stderr
    new, old = invoke("verify", synth_store, "--source", synth_root), invoke("verify", synth_store, "--sources", synth_root)
    assert new.exit_code == old.exit_code == 0 and "use --source" in old.stderr
    bad = invoke("eval", synth_store, "--method", "identity", "--report", "pdf")
    assert "--report must be text, markdown, csv or json, not 'pdf'" in str(bad.exception)
