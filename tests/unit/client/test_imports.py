"""The CLI starts fast and the API process never imports torch (checked in fresh interpreters)."""
from __future__ import annotations

import json
import subprocess
import sys

CHECK = """
import json, sys
{body}
print(json.dumps({{m: m in sys.modules for m in ("torch", "transformers", "sqlalchemy",
                                                  "celery", "lorry.engine.llm_engine")}}))
"""


def loaded(body: str) -> dict:
    out = subprocess.run([sys.executable, "-c", CHECK.format(body=body)], capture_output=True,
                         text=True, timeout=120, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_cli_help_imports_nothing_heavy():
    mods = loaded("import lorry.cli")
    assert not any(mods.values()), mods


def test_api_app_never_imports_torch(tmp_path):
    mods = loaded(f"""
from lorry.settings import Settings
from lorry.api.app import create_app
s = Settings(database_url="sqlite:///{tmp_path}/x.db", model="{tmp_path}")
app = create_app(s, nudger=None, redis_client=None)
app.openapi()
""")
    assert not mods["torch"] and not mods["transformers"] and not mods["lorry.engine.llm_engine"]
