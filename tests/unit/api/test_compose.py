"""compose.yaml: valid against the Compose spec; every command is a real `lorry` command."""
from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest
import yaml
from typer.testing import CliRunner

from lorry.cli import app

ROOT = Path(__file__).resolve().parents[3]
SCHEMA = Path("/work/shared/schemas/compose-spec.json")
if not SCHEMA.is_file():  # a copy outside the shared folder, where CI keeps one
    SCHEMA = ROOT / "docs" / "compose-spec.json"
COMPOSE = yaml.safe_load((ROOT / "compose.yaml").read_text())


def test_compose_is_valid_against_the_spec():
    jsonschema.validate(COMPOSE, json.loads(SCHEMA.read_text()))
    assert {"postgres", "redis", "migrate", "api", "gpu-worker", "beat", "flower"} <= set(
        COMPOSE["services"])
    gpu = COMPOSE["services"]["gpu-worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert gpu[0]["capabilities"] == ["gpu"]
    assert "LORRY_FLOWER_BASIC_AUTH" in COMPOSE["services"]["flower"]["environment"]


LORRY_COMMANDS = [s["command"] for s in COMPOSE["services"].values()
                  if s.get("command") and s["command"][0] == "lorry"]


@pytest.mark.parametrize("command", LORRY_COMMANDS, ids=lambda c: " ".join(c[1:3]))
def test_every_command_is_a_real_cli_command(command):
    # Click parses every option before acting on --help: an unknown option fails here.
    result = CliRunner().invoke(app, [*command[1:], "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage" in result.output
