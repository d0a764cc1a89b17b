"""Background adapter loads in the loader process (EngineConfig.lora_load_process): the same
tokens as PEFT and as loads in a thread, the same refusals, confinement to the adapter roots
in the process, a dead process costing only the load in flight, no files left behind."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from lorry.engine import EngineConfig, LLMEngine, LoRARequest, SamplingParams
from lorry.engine.errors import AdapterSourceError, LoRAError
from lorry.engine.lora import load_process
from tests.unit.engine.conftest import peft_greedy

GREEDY = SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True)
NAMES = ["qv_r8", None, "all_r4_rslora", "mlp_r16", "pattern", "qv_r8"]
PROMPTS = [[5, 6, 7], [9], [3, 4, 5, 6, 7, 8], [11, 12], [13], [21, 22, 23]]


def _engine(base, **kw):
    cfg = {"max_loras": 4, "max_lora_rank": 16, "max_cpu_loras": 8, "max_num_seqs": 8,
           "max_model_len": 128, "device": "cpu", "lora_load_process": True, **kw}
    return LLMEngine(EngineConfig(model=str(base.dir), **cfg))


def _staging_files() -> set:
    return {(d, f) for d in load_process.staging_dirs() for f in os.listdir(d)
            if f.startswith("lorry-lora-")}


def _run(eng, prompts, loras) -> dict:
    for i, (p, lr) in enumerate(zip(prompts, loras)):
        eng.add_request(str(i), p, GREEDY, lr)
    outs = {}
    while eng.has_unfinished_requests():
        outs.update({o.request_id: o for o in eng.step()})
    return outs


def test_process_loads_give_peft_tokens_and_leave_no_files(tiny_llama):
    before = _staging_files()
    eng = _engine(tiny_llama)
    dirs = list(eng.loras.process._dirs)
    try:
        assert eng.loras.process is not None
        reqs = {n: LoRARequest(n, i + 1, str(p)) for i, (n, p) in
                enumerate(tiny_llama.adapters.items())}
        outs = eng.generate(PROMPTS, GREEDY, [reqs[n] if n else None for n in NAMES],
                            use_tqdm=False)
        peft = tiny_llama.peft()
        for out, name in zip(outs, NAMES):
            tokens, _ = peft_greedy(peft, out.prompt_token_ids, 5, name)
            assert out.outputs[0].token_ids == tokens, f"row with adapter {name}"
        assert eng.loras.background_loads == 4 and eng.cache_stats()["cpu"]["misses"] == 4
        # each staging file removed once read: the process's own directories hold no more
        assert [sorted(os.listdir(d)) for d in dirs] in (
            [[]] * len(dirs), [[]] * (len(dirs) - 1) + [["settings.pickle"]])
    finally:
        eng.loras.close()
    proc = eng.loras.process._proc
    assert proc.poll() is not None                    # close() ended the process
    assert _staging_files() == before                 # and its directories went with it


def test_process_refusals_fail_only_their_request(tiny_llama, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(tiny_llama.adapters["qv_r8"], bad)
    (bad / "adapter_model.safetensors").write_bytes(b"not a safetensors file")
    errors = {}
    for in_process in (True, False):
        eng = _engine(tiny_llama, lora_load_process=in_process)
        try:
            good = LoRARequest("qv_r8", 1, str(tiny_llama.adapters["qv_r8"]))
            outs = _run(eng, [[5, 6], [5, 6], [5, 6]],
                        [None, LoRARequest("bad", 7, str(bad)), good])
            assert outs["1"].outputs[0].finish_reason == "error"
            errors[in_process] = outs["1"].error
            for rid in ("0", "2"):
                assert outs[rid].error is None and len(outs[rid].outputs[0].token_ids) == 5
            assert 7 not in eng.list_loras()["cpu"] and 1 in eng.list_loras()["cpu"]
        finally:
            eng.loras.close()
    assert "corrupt safetensors file" in errors[True]
    assert errors[True] == errors[False]             # the thread's refusal, word for word


def test_adapter_roots_are_enforced_in_the_process(tiny_llama, tmp_path):
    root = tmp_path / "allowed"
    root.mkdir()
    inside = shutil.copytree(tiny_llama.adapters["qv_r8"], root / "qv")
    eng = _engine(tiny_llama, adapter_roots=(str(root),))
    try:
        # the engine's own check refuses at add_request; the process checks again at load
        # (the path may change in between): ask the process directly for an outside path
        with pytest.raises(AdapterSourceError):
            eng.loras.process.load(str(tiny_llama.adapters["mlp_r16"]), None, "outside")
        outs = _run(eng, [[5, 6]], [LoRARequest("qv", 1, str(inside))])
        assert outs["0"].error is None
        # a request's own roots travel to the process and are checked there
        other = root / "other"
        other.mkdir()
        with pytest.raises(AdapterSourceError, match="outside the allowed adapter roots"):
            eng.loras.process.load(str(inside), None, "qv", (str(other),))
        # the files are read through a private folder in the process's own directory,
        # removed with it should the process be killed; nothing is left after a load
        pin_dir = eng.loras.process._dirs[0]
        eng.loras.process.load(str(inside), None, "qv", (str(root),))
        assert not [n for n in os.listdir(pin_dir) if n.startswith("lorry-adapter-")]
    finally:
        eng.loras.close()


def test_a_loader_process_that_ended_while_idle_is_replaced_before_the_next_load(tiny_llama):
    eng = _engine(tiny_llama)
    try:
        proc = eng.loras.process
        proc._proc.kill()
        proc._proc.wait()
        outs = _run(eng, [[5, 6]], [LoRARequest("qv_r8", 1, str(tiny_llama.adapters["qv_r8"]))])
        assert outs["0"].error is None and len(outs["0"].outputs[0].token_ids) == 5
        assert proc.restarts == 1 and proc._proc.poll() is None
    finally:
        eng.loras.close()


HANG = ("import json, sys, time; sys.path[:] = json.loads(sys.argv[3]); import torch\n"
        "from lorry.engine.lora import load_process as lp\n"
        "def hang(settings, files, *args):\n"
        "    files.alloc(1024, torch.float32)\n"
        "    time.sleep(600)\n"
        "lp._load = hang\n"
        "lp.serve()")


def _hung_load(tiny_llama, monkeypatch):
    """A loader process whose loads make their staging file, then hang; a load started in a
    thread, returned once its file exists: (process, thread, the load's outcome, dirs)."""
    eng = _engine(tiny_llama)
    settings = eng.loras.process._settings
    eng.loras.close()
    monkeypatch.setattr(load_process, "CHILD", HANG)
    proc = load_process.LoadProcess(settings)
    outcome: list = []

    def run():
        try:
            outcome.append(proc.load(str(tiny_llama.adapters["qv_r8"]), None, "qv_r8"))
        except LoRAError as e:
            outcome.append(e)
    th = threading.Thread(target=run)
    th.start()
    dirs = list(proc._dirs)
    deadline = time.monotonic() + 120
    while not any(f.startswith("lorry-lora-") for d in dirs for f in os.listdir(d)):
        assert time.monotonic() < deadline, "the hung load made no staging file"
        time.sleep(0.05)
    return proc, th, outcome, dirs


def test_a_loader_process_dying_mid_load_fails_that_load_and_leaves_no_files(
        tiny_llama, monkeypatch):
    proc, th, outcome, dirs = _hung_load(tiny_llama, monkeypatch)
    proc._proc.kill()
    th.join(30)
    assert isinstance(outcome[0], LoRAError) and "ended (exit code -9)" in str(outcome[0])
    assert not any(os.path.exists(d) for d in dirs)  # its staging file went with its dirs
    assert proc.restarts == 1 and proc._proc.poll() is None
    proc.close()
    assert not any(os.path.exists(d) for d in proc._dirs)


def test_close_ends_a_hung_load_at_once(tiny_llama, monkeypatch):
    proc, th, outcome, dirs = _hung_load(tiny_llama, monkeypatch)
    t0 = time.monotonic()
    proc.close()
    assert time.monotonic() - t0 < 5
    th.join(10)
    assert isinstance(outcome[0], LoRAError) and "closed" in str(outcome[0])
    assert proc._proc.poll() is not None and proc.restarts == 0
    assert not any(os.path.exists(d) for d in dirs)


def test_a_script_without_a_main_guard_is_not_run_again_by_the_loader(tiny_llama, tmp_path):
    """The loader is a ``python -c`` child, not multiprocessing's spawn, which would import
    the caller's script again (and build a second engine in it)."""
    script = tmp_path / "plain.py"
    marker = tmp_path / "runs.txt"
    script.write_text(textwrap.dedent(f"""
        from lorry.engine import EngineConfig, LLMEngine, LoRARequest, SamplingParams
        with open({str(marker)!r}, "a") as f:
            f.write("run\\n")
        eng = LLMEngine(EngineConfig(model={str(tiny_llama.dir)!r}, max_loras=2,
                                     max_lora_rank=8, max_model_len=64, device="cpu",
                                     lora_load_process=True))
        req = LoRARequest("qv", 1, {str(tiny_llama.adapters["qv_r8"])!r})
        out = eng.generate([[5, 6]], SamplingParams(max_tokens=3, temperature=0.0), req,
                           use_tqdm=False)[0]
        print("tokens", out.outputs[0].token_ids, out.error)
        eng.loras.close()
    """))
    import lorry

    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [os.path.dirname(os.path.dirname(lorry.__file__)), os.environ.get("PYTHONPATH", "")]))
    res = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                         env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "tokens [" in res.stdout and "None" in res.stdout
    assert marker.read_text() == "run\n"


def test_a_script_in_the_current_directory_does_not_shadow_the_loaders_imports(
        tiny_llama, tmp_path, monkeypatch):
    """The child runs isolated with the engine's sys.path: a safetensors.py in the current
    directory is not imported by the loader process (as it is not by a console script)."""
    (tmp_path / "safetensors.py").write_text("raise ImportError('shadowed')\n")
    monkeypatch.chdir(tmp_path)
    eng = _engine(tiny_llama)
    try:
        outs = _run(eng, [[5, 6]], [LoRARequest("qv_r8", 1, str(tiny_llama.adapters["qv_r8"]))])
        assert outs["0"].error is None
    finally:
        eng.loras.close()


def test_staging_files_fall_back_to_a_directory_with_room(tmp_path):
    """A staging directory that cannot take the file (missing here; full, in a container's
    64 MB /dev/shm) is passed over for the next."""
    import torch

    files = load_process._Files([str(tmp_path / "missing"), str(tmp_path)])
    t = files.alloc(1000, torch.bfloat16)
    assert t.numel() == 1000 and len(files.made) == 1
    assert os.path.dirname(files.made[0]) == str(tmp_path)
    assert os.path.getsize(files.made[0]) == 2000
    files.remove_all()
    assert not list(tmp_path.glob("lorry-lora-*"))
    with pytest.raises(OSError, match="no room"):
        load_process._Files([str(tmp_path / "missing")]).alloc(10, torch.float32)


def test_cpu_engines_load_in_a_thread_unless_asked(tiny_llama):
    eng = LLMEngine(EngineConfig(model=str(tiny_llama.dir), max_loras=2, max_lora_rank=8,
                                 max_model_len=64, device="cpu"))
    assert eng.loras.process is None
    with pytest.raises(ValueError, match="lora_load_process"):
        EngineConfig(model=str(tiny_llama.dir), lora_load_process="yes")
