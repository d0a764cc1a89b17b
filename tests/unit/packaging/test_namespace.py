"""One import namespace: the repository's folders are `lorry.*`, and no folder of the checkout
takes the place of an installed package - even with the repo root first on sys.path, as it is
for `python -m ...` and `python -c ...` run from there."""
from __future__ import annotations

import ast
import json
import subprocess
import sys
from importlib.metadata import packages_distributions
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[3]
FOLDERS = ("engine", "kernels", "scheduler", "workers", "api", "migrations")


def in_checkout(location: str) -> bool:
    """Whether a module file or package folder lies in the checkout (not in the venv)."""
    path = Path(location).resolve()
    return path.is_relative_to(REPO) and not path.is_relative_to(Path(sys.prefix).resolve())


def run_from_repo_root(code: str) -> dict:
    """Run ``python -c code`` with the repo root as working directory (sys.path[0] == '')."""
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                         timeout=300, check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_kernels_is_hugging_faces_package_beside_transformers_and_bitsandbytes():
    got = run_from_repo_root("""
import json, sys
import transformers.activations, bitsandbytes
import kernels, lorry.kernels.backends
from lorry.engine import LLMEngine, EngineConfig, SamplingParams, LoRARequest
print(json.dumps({"kernels": kernels.__file__, "get_kernel": hasattr(kernels, "get_kernel"),
                  "ours": lorry.kernels.backends.__file__,
                  "torch_ops": lorry.kernels.backends.get_lora_ops("reference").__name__,
                  "engine": LLMEngine.__module__, "path0": sys.path[0]}))
""")
    assert got["path0"] == ""  # the repo root is first on sys.path, as for `python -m`
    assert not in_checkout(got["kernels"]), got
    assert got["get_kernel"], "import kernels must be Hugging Face's package"
    assert Path(got["ours"]).resolve() == REPO / "kernels" / "backends.py"
    assert got["torch_ops"] == "lorry.kernels.torch_ref"
    assert got["engine"] == "lorry.engine.llm_engine"


def test_no_folder_of_the_checkout_shadows_an_installed_package():
    installed = sorted(n for n in packages_distributions() if n.isidentifier() and n != "lorry")
    got = run_from_repo_root(f"""
import importlib.util, json
out = {{}}
for name in {installed!r}:
    spec = importlib.util.find_spec(name)
    if spec is not None:
        out[name] = spec.origin or list(spec.submodule_search_locations or [])
print(json.dumps(out))
""")
    assert "kernels" in got  # transformers needs it; the check below is not vacuous
    shadowed = {name: where for name, where in got.items()
                if any(in_checkout(p) for p in (where if isinstance(where, list) else [where]))}
    assert shadowed == {}


def test_scripts_and_benchmarks_shadow_no_module():
    # `python benchmarks/x.py` puts benchmarks/ first on sys.path: none of its files may be
    # named like a standard-library or installed module (benchmarks/queue.py once was).
    taken = set(sys.stdlib_module_names) | set(packages_distributions())
    clashes = [p.relative_to(REPO).as_posix()
               for folder in ("benchmarks", "scripts") for p in (REPO / folder).glob("*.py")
               if p.stem in taken]
    assert clashes == []


def _python_files():
    for folder in ("lorry", *FOLDERS, "tests", "benchmarks", "scripts"):
        for path in (REPO / folder).rglob("*.py"):
            if "__pycache__" not in path.parts and not (folder != "lorry" and
                                                        path.is_relative_to(REPO / "lorry")):
                yield path


def test_code_imports_the_folders_only_as_lorry_subpackages():
    bare = []
    for path in _python_files():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module] if isinstance(node, ast.ImportFrom) and node.module and \
                not node.level else []
            bare += [f"{path.relative_to(REPO)}:{node.lineno} {n}" for n in names
                     if n.split(".")[0] in FOLDERS]
    assert bare == []


@pytest.mark.parametrize("folder", FOLDERS)
def test_each_folder_is_a_lorry_subpackage(folder):
    link = REPO / "lorry" / folder
    assert link.is_symlink() and link.resolve() == REPO / folder
