"""Where an adapter may come from (engine/lora/sources.py, shared by the API and the engine):
an absolute path inside the allowed roots (symlinks resolved, per tenant when configured) or
a Hub id 'owner/name' that is never read from local disk; the worker checks again at load."""
from __future__ import annotations

import os
import shutil
import sys

import pytest

from lorry.engine import EngineConfig, LLMEngine, LoRAError, LoRARequest, SamplingParams
from lorry.engine.errors import AdapterSourceError
from tests.security.conftest import counts


def message(r) -> str:
    """The error message of an API answer (OpenAI's shape or FastAPI's)."""
    body = r.json()
    return body["error"]["message"] if "error" in body else str(body["detail"])


def refused(service, client, source: str, *needles: str) -> str:
    """POST the source; assert a 422 naming each needle and that nothing was stored."""
    url = service[3]
    before = counts(url)
    r = client.post("/v1/adapters", json={"name": "x", "source": source})
    assert r.status_code == 422, r.text
    text = message(r)
    for needle in needles:
        assert needle in text, (needle, text)
    assert counts(url) == before
    return text


def copy_adapter(good, dest):
    if not dest.exists():
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copytree(good, dest)
    return dest


def engine(settings=None, **kw) -> LLMEngine:
    base = {"device": "cpu", "max_loras": 2, "max_lora_rank": 16, "max_cpu_loras": 2,
            "max_model_len": 128}
    if settings is not None:  # the worker's path: Settings -> EngineConfig
        return LLMEngine(settings.engine_config(**base, **kw))
    return LLMEngine(EngineConfig(**base, **kw))


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    """An empty Hugging Face cache, offline: a Hub id resolves to nothing, without network."""
    import huggingface_hub.constants as c

    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(cache))
    return cache


def test_a_hub_id_is_never_served_from_the_working_directory(service, alice, roots, tmp_path,
                                                              monkeypatch, offline_hub):
    """'outside/evil' is a Hub id even when ./outside/evil is a valid adapter in the cwd of
    the API and of the worker: refused when Hub adapters are off, otherwise stored as a Hub
    id (not validated from disk) that the engine fetches from the Hub only."""
    _app, _queue, settings, _url = service
    cwd = tmp_path / "cwd"
    copy_adapter(roots[0] / "good", cwd / "outside" / "evil")
    monkeypatch.chdir(cwd)

    monkeypatch.setattr(settings, "allow_hub_adapters", False)
    refused(service, alice, "outside/evil", "'outside/evil'", "Hub adapters are disabled")
    refused(service, alice, "./outside/evil", "neither an absolute local path nor a Hub repo id")
    refused(service, alice, "outside", "neither an absolute local path nor a Hub repo id")

    monkeypatch.setattr(settings, "allow_hub_adapters", True)
    r = alice.post("/v1/adapters", json={"name": "evil", "source": "outside/evil"})
    assert r.status_code == 201, r.text
    assert (r.json()["source"], r.json()["revision"], r.json()["rank"]) == \
        ("outside/evil", "main", None)  # no rank: nothing was read from disk

    eng = engine(settings)
    with pytest.raises(LoRAError, match="'outside/evil'.*could not be fetched from the Hugging"):
        eng.add_lora(LoRARequest("evil", 5, "outside/evil", revision="main"))
    for relative in ("./outside/evil", "outside"):
        with pytest.raises(AdapterSourceError, match="neither an absolute local path"):
            eng.add_lora(LoRARequest("evil", 6, relative))
    assert eng.cache_stats()["cpu"]["residents"] == 0
    library = engine(model=settings.model)  # no roots: the form rule holds all the same
    with pytest.raises(LoRAError, match="could not be fetched from the Hugging Face Hub"):
        library.add_lora(LoRARequest("evil", 5, "outside/evil"))


def test_escapes_from_the_roots_are_refused(service, alice, roots, tmp_path):
    root, outside = roots
    link = root / f"link-{tmp_path.name}"
    link.symlink_to(outside / "elsewhere")
    text = refused(service, alice, str(link), "outside the allowed adapter roots")
    assert str(outside / "elsewhere") not in text  # a tenant is not told where it points
    for probe in ("/proc/self/cwd", "/proc/self/fd/0", "~root/x", "/proc/self/exe"):
        text = refused(service, alice, probe, "outside the allowed adapter roots")
        assert "resolved" not in text, text
    assert os.path.realpath(sys.executable) not in text   # the last probe's: the server's python
    refused(service, alice, f"{root}/good/../../{outside.name}/elsewhere",
            "outside the allowed adapter roots")
    # the directory is inside, its weights file is a symlink to another directory's
    mixed = root / f"mixed-{tmp_path.name}"
    mixed.mkdir()
    shutil.copy(root / "good" / "adapter_config.json", mixed / "adapter_config.json")
    (mixed / "adapter_model.safetensors").symlink_to(
        outside / "elsewhere" / "adapter_model.safetensors")
    refused(service, alice, str(mixed), "adapter_model.safetensors", "outside the allowed")
    refused(service, alice, "~no-such-user-lorry/x", "does not expand to an absolute path")
    refused(service, alice, "owner/name/extra", "neither an absolute local path")
    refused(service, alice, "owner--x/name", "neither an absolute local path")
    r = alice.post("/v1/adapters", json={"name": "x", "source": "owner/name",
                                         "revision": "../../refs"})
    assert r.status_code == 422 and "revision '../../refs' is invalid" in message(r), r.text


def test_a_tenant_cannot_register_another_tenants_directory(service, alice, bob, roots,
                                                           monkeypatch, tmp_path):
    """With per-tenant roots a tenant names only paths under {root}/{its tenant id}; the
    operator's shared registrations keep the plain roots."""
    from lorry.adapters import register_shared

    _app, queue, settings, _url = service
    monkeypatch.setattr(settings, "adapter_roots_per_tenant", True)
    root = roots[0]
    alices = copy_adapter(root / "good", root / alice.tenant.id / "mine")
    bobs = copy_adapter(root / "good", root / bob.tenant.id / "his")
    alias = root / bob.tenant.id / f"alias-{tmp_path.name}"
    alias.symlink_to(alices)

    text = refused(service, bob, str(alices), "outside the allowed adapter roots")
    assert str(root / bob.tenant.id) in text and str(root / alice.tenant.id) not in \
        text.split("roots", 1)[1]  # the roots named are bob's own
    text = refused(service, bob, str(alias), "outside the allowed adapter roots")
    assert str(alices) not in text   # where bob's link leads, in alice's directory: not said
    refused(service, alice, str(root / "good"), "outside the allowed adapter roots")
    for client, path in ((alice, alices), (bob, bobs)):
        r = client.post("/v1/adapters", json={"name": "own", "source": str(path)})
        assert r.status_code == 201, r.text
    assert [a["source"] for a in bob.get("/v1/adapters").json()["data"]] == [str(bobs)]

    shared = register_shared(queue, settings, "shared-good", str(root / "good"))
    assert shared.tenant_id is None and shared.rank == 8
    with pytest.raises(LoRAError, match="outside the allowed adapter roots"):
        register_shared(queue, settings, "shared-out", str(roots[1] / "elsewhere"))
    names = sorted(a["name"] for a in alice.get("/v1/adapters").json()["data"])
    assert names == ["own", "shared-good"]


def test_the_worker_refuses_at_load_a_path_outside_its_roots(service, alice, roots, tmp_path):
    """A row naming a path outside the roots (written straight into the table, or a directory
    swapped for a symlink after registration) is refused by the engine when it loads it."""
    _app, queue, settings, _url = service
    root, outside = roots
    smuggled = queue.register_adapter("smuggled", str(outside / "elsewhere"), rank=8)
    swapped_dir = copy_adapter(root / "good", root / f"swap-{tmp_path.name}")
    r = alice.post("/v1/adapters", json={"name": "swapped", "source": str(swapped_dir)})
    assert r.status_code == 201, r.text
    shutil.rmtree(swapped_dir)
    swapped_dir.symlink_to(outside / "elsewhere")
    swapped = queue.get_adapter("swapped", alice.tenant.id)

    eng = engine(settings)
    assert eng.config.adapter_roots == (str(root),)
    good = LoRARequest("good", 1000, str(root / "good"))  # an id no table row uses
    eng.add_lora(good)  # inside the roots: served
    for info in (smuggled, swapped):
        request = LoRARequest(info.name, info.id, info.source)
        with pytest.raises(AdapterSourceError, match="outside the allowed adapter roots"):
            eng.add_lora(request)
        eng.add_request(f"job-{info.name}", "hello", SamplingParams(max_tokens=2), request)
    finished = {}
    while eng.has_unfinished_requests():
        finished.update({o.request_id: o for o in eng.step()})
    for info in (smuggled, swapped):
        out = finished[f"job-{info.name}"]
        assert out.outputs[0].finish_reason == "error"
        assert "outside the allowed adapter roots" in out.error
    assert eng.cache_stats()["cpu"]["residents"] == 1  # only the adapter inside the roots


def test_the_roots_setting_reaches_the_engine(monkeypatch):
    from lorry.settings import Settings

    monkeypatch.setenv("LORRY_ADAPTER_ROOTS", "/srv/a:/srv/b")
    monkeypatch.setenv("LORRY_ADAPTER_ROOTS_PER_TENANT", "true")
    settings = Settings(model="/models/base")
    assert settings.adapter_roots_per_tenant is True
    assert settings.engine_config().adapter_roots == ("/srv/a", "/srv/b")
    assert EngineConfig(model="/models/base").adapter_roots is None  # library use: anywhere
    with pytest.raises(ValueError, match="adapter_roots"):
        EngineConfig(model="/models/base", adapter_roots="/srv/a")


def test_the_operators_relative_directory_is_local_and_confined(service, roots, monkeypatch,
                                                                 offline_hub):
    """`lorry adapter add NAME adapters/sql` run where adapters/sql is a directory registers
    that directory (absolute, its rank read), as from_pretrained prefers a local directory;
    it must still lie in the roots; a Hub-looking name with no such directory stays a Hub id
    (the API never does this: test_a_hub_id_is_never_served_from_the_working_directory)."""
    from lorry.adapters import operator_source, register_shared

    _app, queue, settings, _url = service
    root = roots[0]
    copy_adapter(root / "good", root / "team" / "sql")
    monkeypatch.chdir(root)
    local = register_shared(queue, settings, "rel-sql", "team/sql")
    assert (local.source, local.rank) == (str(root / "team" / "sql"), 8)
    monkeypatch.chdir(root / "team")
    assert operator_source("sql") == str(root / "team" / "sql")
    assert operator_source("team/sql") == "team/sql"     # no such directory here: a Hub id
    outside = copy_adapter(root / "good", roots[1] / "op" / "x")
    monkeypatch.chdir(outside.parent.parent)
    with pytest.raises(LoRAError, match="outside the allowed adapter roots"):
        register_shared(queue, settings, "rel-out", "op/x")


def test_operator_registrations_keep_the_tenants_name_rule_and_reuse(service, roots):
    """Names a tenant route would refuse ('a b', 81 characters) were registered by the
    operator's tools and then unusable; an embedded run on a --database used before failed
    on its own adapters ("already exists"): the same adapter is now kept, another refused."""
    from lorry.adapters import register_shared
    from lorry.embedded import register_adapters

    _app, queue, settings, _url = service
    good = str(roots[0] / "good")
    for name in ("a b", "x" * 81, "-dash", "ünï"):
        with pytest.raises(ValueError, match="adapter name .* is invalid"):
            register_shared(queue, settings, name, good)
    assert register_adapters(queue, settings, {"team.sql-1": good}) == ["team.sql-1"]
    assert register_adapters(queue, settings, {"team.sql-1": good}) == ["team.sql-1"]
    other = copy_adapter(roots[0] / "good", roots[0] / "other")
    with pytest.raises(ValueError, match="registered in this database with the source"):
        register_adapters(queue, settings, {"team.sql-1": str(other)})
    assert [a.name for a in queue.list_adapters(None)] == ["team.sql-1"]


def test_an_embedded_run_refuses_an_output_it_cannot_write_before_running(service, tmp_path):
    """The output path was opened after every request had run: a missing folder lost the
    whole run (traceback, results deleted with the temporary database)."""
    from pathlib import Path

    from lorry.embedded import run_file

    _app, _queue, settings, _url = service
    batch = tmp_path / "in.jsonl"
    batch.write_text('{"custom_id": "a", "method": "POST", "url": "/v1/completions", '
                     '"body": {"model": "base", "prompt": "x"}}\n')
    for out, words in ((tmp_path / "missing" / "out.jsonl", "does not exist"),
                       (tmp_path, "is a directory")):
        with pytest.raises(ValueError, match=words):
            run_file(settings, batch, Path(out))


def _per_tenant_pair(service, alice, bob, roots, monkeypatch, dirname: str):
    """Per-tenant roots on; bob's adapter 'his' and alice's registered 'mine' (dirname):
    (queue, settings, alice's directory, bob's directory)."""
    _app, queue, settings, _url = service
    monkeypatch.setattr(settings, "adapter_roots_per_tenant", True)
    root = roots[0]
    bobs = copy_adapter(root / "good", root / bob.tenant.id / "his")
    mine = copy_adapter(root / "good", root / alice.tenant.id / dirname)
    r = alice.post("/v1/adapters", json={"name": "mine", "source": str(mine)})
    assert r.status_code == 201, r.text
    return queue, settings, mine, bobs


def test_the_worker_keeps_a_tenants_adapter_in_its_own_root_and_hub_rules(
        service, alice, bob, roots, monkeypatch, tmp_path, offline_hub):
    """With per-tenant roots, a tenant's directory swapped after registration for a symlink
    to another tenant's adapter (inside the plain roots) served the other tenant's weights;
    a Hub row kept from before LORRY_ALLOW_HUB_ADAPTERS=false was fetched. The worker
    refuses both at load: the jobs fail as adapter_unloadable and nothing is loaded."""
    from lorry.scheduler.types import is_adapter_failure
    from lorry.workers.runtime import build_drainer

    queue, settings, mine, bobs = _per_tenant_pair(service, alice, bob, roots, monkeypatch,
                                                   f"mine-{tmp_path.name}")
    shutil.rmtree(mine)
    mine.symlink_to(bobs)
    queue.register_adapter("hubby", "owner/name", tenant_id=alice.tenant.id, revision="main")
    monkeypatch.setattr(settings, "allow_hub_adapters", False)
    ids = {name: alice.post("/v1/jobs", json={"prompt": "hi", "adapter": name, "sampling": {
        "max_tokens": 2}}).json()["id"] for name in ("mine", "hubby")}

    eng = engine(settings)
    build_drainer(settings, queue=queue, engine=eng, publish=False).run(stop_when_empty=True)
    for name, needle in (("mine", "outside the allowed adapter roots"),
                         ("hubby", "Hub adapters are disabled")):
        job = queue.get_job(ids[name])
        assert job.status == "failed" and needle in job.error, (name, job.error)
        assert is_adapter_failure(job.error), job.error
    assert eng.cache_stats()["cpu"]["residents"] == 0


def test_a_directory_swapped_after_the_workers_check_is_refused_when_read(
        service, alice, bob, roots, monkeypatch, tmp_path):
    """The worker checked the tenant's roots when it claimed the job, the engine read the
    files later against the plain roots only: a swap in between served the other tenant's
    weights. The tenant's roots travel in the LoRARequest and are checked at the read."""
    from lorry.workers.runtime import adapter_rules, build_drainer

    queue, settings, mine, bobs = _per_tenant_pair(service, alice, bob, roots, monkeypatch,
                                                   f"swap-{tmp_path.name}")
    job_id = alice.post("/v1/jobs", json={"prompt": "hi", "adapter": "mine", "sampling": {
        "max_tokens": 2}}).json()["id"]
    rules = adapter_rules(settings)

    def check_then_swap(adapter):
        found = rules(adapter)   # passes: the directory is still alice's own
        assert found and all(alice.tenant.id in r for r in found)
        shutil.rmtree(mine)
        mine.symlink_to(bobs)
        return found

    eng = engine(settings)
    build_drainer(settings, queue=queue, engine=eng, publish=False,
                  check_adapter=check_then_swap).run(stop_when_empty=True)
    job = queue.get_job(job_id)
    assert job.status == "failed" and "outside the allowed adapter roots" in job.error, job.error
    assert str(bobs) not in job.error   # the tenant is not told where the link points
    assert eng.cache_stats()["cpu"]["residents"] == 0


def test_a_huge_config_an_overlong_name_and_a_huge_error_are_bounded(service, alice, roots,
                                                                      tmp_path):
    """A sparse 2 GB adapter_config.json cost the API 4 GB of memory before its 422; a path
    component longer than the filesystem allows was a 500; a tensor name of 20 MB in the
    safetensors header made each job's stored error 20 MB."""
    import time

    from lorry.scheduler import JobSpec
    from lorry.scheduler.leases import MAX_ERROR_CHARS

    root, _ = roots
    huge = root / f"huge-{tmp_path.name}"
    shutil.copytree(root / "good", huge)
    with open(huge / "adapter_config.json", "r+b") as f:
        f.truncate(2 * 1024 ** 3)   # sparse: no disk used
    started = time.monotonic()
    refused(service, alice, str(huge), "adapter_config.json is 2147483648 bytes")
    assert time.monotonic() - started < 5
    refused(service, alice, f"{root}/{'a' * 300}", "cannot be read")
    queue = service[1]
    [job] = queue.submit(alice.tenant.id, [JobSpec(adapter=None, prompt="p")])
    [claimed] = [j for mb in queue.claim("w", [], [], free_slots=1) for j in mb.jobs]
    name = "n" * 2_000_000
    assert queue.fail(claimed.id, claimed.lease_token, f"tensor {name!r} is unknown",
                      retryable=False) == "failed"
    error = queue.get_job(job.id).error
    assert len(error) <= MAX_ERROR_CHARS + 100 and error.startswith("tensor 'nnn")
    assert "characters cut" in error and error.endswith("' is unknown")


def test_a_file_swapped_for_a_link_out_of_the_roots_after_the_check_is_not_read(
        roots, tiny_model, tmp_path, monkeypatch):
    """check_source resolved the files once and the readers opened them again by name: a
    file renamed to a link out of the roots in between was read (71 of 3,000 raced loads
    took the outside weights). The files are opened once, checked as opened, and read
    through those openings."""
    import torch
    from safetensors.torch import load_file

    from lorry.engine.lora import spec as spec_mod
    from lorry.engine.lora.sources import pinned_files

    root, outside = roots
    good = load_file(str(root / "good" / "adapter_model.safetensors"))
    theirs = outside / "elsewhere" / "adapter_model.safetensors"
    assert any(not torch.equal(good[k], v) for k, v in load_file(str(theirs)).items())

    def swap(directory):
        weights = directory / "adapter_model.safetensors"
        weights.unlink()
        weights.symlink_to(theirs)

    mine = copy_adapter(root / "good", root / f"pin-{tmp_path.name}")
    with pinned_files(str(mine), [[str(root)]]) as read_from:
        swap(mine)   # after the check, before the read
        read = load_file(os.path.join(read_from, "adapter_model.safetensors"))
    assert read.keys() == good.keys() and all(torch.equal(read[k], good[k]) for k in good)
    with pytest.raises(AdapterSourceError, match="outside the allowed adapter roots"):
        with pinned_files(str(mine), [[str(root)]]):   # a link out when opened: refused
            pass

    # the engine's read: the swap made certain between its checks and its reads
    raced = copy_adapter(root / "good", root / f"race-{tmp_path.name}")
    real_parse = spec_mod.parse_adapter

    def swap_then_parse(path, *a, **kw):
        swap(raced)
        return real_parse(path, *a, **kw)

    monkeypatch.setattr(spec_mod, "parse_adapter", swap_then_parse)
    eng = engine(model=str(tiny_model), adapter_roots=[str(root)])
    weights = eng.loras._load(LoRARequest("race", 7, str(raced)))
    assert weights.spec.path == raced   # messages name the adapter's own directory
    ref = eng.loras._load(LoRARequest("ref", 8, str(root / "good")))

    def same(a, b) -> bool:
        if isinstance(a, torch.Tensor):
            return torch.equal(a, b)
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))

    assert weights.tensors and weights.tensors.keys() == ref.tensors.keys()
    assert all(same(weights.tensors[k], ref.tensors[k]) for k in ref.tensors)


def test_pinned_reads_name_the_adapters_own_directory_and_leave_other_files_alone(
        roots, tiny_model, tmp_path):
    """Refusals named the private folder the files were read through; a stray socket named
    adapter_model.bin beside good safetensors failed the adapter; roots given as a string
    were split into characters ('/' among them: no confinement)."""
    import socket

    from lorry.engine.lora.sources import pinned_files
    from lorry.engine.lora.spec import parse_adapter, read_base_config

    root, _ = roots
    bad = copy_adapter(root / "good", root / f"bad-{tmp_path.name}")
    (bad / "adapter_model.safetensors").write_bytes(b"\x05" + b"\x00" * 7 + b"{}")
    base = read_base_config(tiny_model)
    with pinned_files(str(bad), [[str(root)]]) as read_from:
        with pytest.raises(LoRAError) as e:
            parse_adapter(bad, base, read_from=read_from)
    assert str(bad) in str(e.value) and "lorry-adapter-" not in str(e.value)

    stray = copy_adapter(root / "good", root / f"stray-{tmp_path.name}")
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(stray / "adapter_model.bin"))
    try:
        with pinned_files(str(stray), [[str(root)]]) as read_from:
            assert parse_adapter(stray, base, read_from=read_from).r == 8
    finally:
        s.close()
    for roots_given in (str(root), [str(root)], ("relative",), ()):
        with pytest.raises(ValueError, match="roots must be"):
            LoRARequest("x", 1, str(stray), roots=roots_given)
