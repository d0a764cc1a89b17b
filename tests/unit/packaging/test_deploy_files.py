"""compose.yaml, the Dockerfile and the lock files agree with the project: the compose file
is valid against the Compose specification, every `lorry` command it runs exists, and the
locks pin every dependency pyproject.toml declares (a new one without `make lock` fails)."""
from __future__ import annotations

import json
import re
from itertools import takewhile
from pathlib import Path

import jsonschema
import tomllib
import yaml
from typer.testing import CliRunner

from lorry.cli import app

REPO = Path(__file__).resolve().parents[3]
# The Compose specification's JSON schema (compose-spec/compose-spec, schema/compose-spec.json).
SCHEMA = REPO / "tests" / "data" / "compose-spec.json"


def _name(requirement: str) -> str:
    return re.split(r"[\[<>=!~ ;]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def _pins(lock: str) -> dict[str, str]:
    lines = (REPO / "requirements" / lock).read_text().splitlines()
    return {_name(line): line.split("==", 1)[1] for line in lines
            if line and not line.startswith("#")}


def test_compose_file_is_valid_against_the_compose_spec():
    compose = yaml.safe_load((REPO / "compose.yaml").read_text())
    jsonschema.Draft7Validator(json.loads(SCHEMA.read_text())).validate(compose)
    assert {"postgres", "redis", "api", "gpu-worker", "beat", "flower"} <= set(compose["services"])


def test_every_lorry_command_in_compose_exists():
    compose = yaml.safe_load((REPO / "compose.yaml").read_text())
    commands = [s["command"] for s in compose["services"].values()
                if isinstance(s.get("command"), list) and s["command"][0] == "lorry"]
    assert len(commands) >= 5
    for command in commands:
        words = list(takewhile(lambda w: not w.startswith("-"), command[1:]))
        result = CliRunner().invoke(app, [*words, "--help"])
        assert result.exit_code == 0, (command, result.output)
        assert "Usage" in result.output


def test_locks_pin_every_declared_dependency():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    runtime = {_name(r) for r in project["dependencies"]}
    extras = {_name(r) for name in ("dev", "quant") for r in project["optional-dependencies"][name]}
    dev, image = _pins("dev.lock"), _pins("image.lock")
    assert runtime | extras <= set(dev), sorted((runtime | extras) - set(dev))
    assert runtime | {"triton"} <= set(image), sorted((runtime | {"triton"}) - set(image))
    assert dev["torch"] == image["torch"] and "+" not in dev["torch"]
    shared = set(dev) & set(image)
    assert {n: (dev[n], image[n]) for n in shared if dev[n] != image[n]} == {}


def test_setup_and_image_install_from_the_locks():
    makefile = (REPO / "Makefile").read_text()
    assert "-c $(LOCK)" in makefile and "LOCK ?= requirements/dev.lock" in makefile
    dockerfile = (REPO / "Dockerfile").read_text()
    assert "-c /tmp/image.lock" in dockerfile and "pip wheel" in dockerfile
