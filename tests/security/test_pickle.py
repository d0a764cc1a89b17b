"""A pickled adapter_model.bin carrying code is never unpickled: its registration is refused
from the pickle opcodes alone, the engine refuses it too, and the payload never runs.

The torch-free scan (engine/lora/pickle_scan.py) must refuse every .bin that
torch.load(weights_only=True) refuses: each hand-made attack below is refused by both, and
is shown to be live (plain pickle.loads runs it) so that a refusal means something."""
from __future__ import annotations

import collections
import datetime
import functools
import os
import pickle
import random
import shutil
import struct
import warnings
import zipfile

import pytest
import torch

from lorry.engine.errors import LoRAError
from lorry.engine.lora.pickle_scan import scan_checkpoint, scan_pickle
from lorry.engine.lora.spec import parse_adapter, read_base_config
from lorry.workers.drain import Drainer
from tests.security.conftest import counts


class Payload:
    """Unpickling this calls os.mkdir(marker): the proof that code ran."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def engine_for(settings):
    from lorry.engine import EngineConfig, LLMEngine

    return LLMEngine(EngineConfig(model=settings.model, device="cpu", max_loras=2,
                                  max_lora_rank=16, max_cpu_loras=2, max_model_len=128))


def evil_adapter(good_dir, out_dir, marker) -> None:
    """The good adapter's config, its weights replaced by a torch-format .bin whose pickle
    holds the payload next to real tensors."""
    out_dir.mkdir()
    shutil.copy(good_dir / "adapter_config.json", out_dir / "adapter_config.json")
    from safetensors.torch import load_file

    tensors = load_file(str(good_dir / "adapter_model.safetensors"))
    torch.save({**tensors, "x": Payload(str(marker))}, str(out_dir / "adapter_model.bin"))
    assert zipfile.is_zipfile(out_dir / "adapter_model.bin")  # what torch.save writes


def test_pickled_bin_with_code_never_runs(service, alice, roots, tmp_path):
    _app, queue, settings, url = service
    root = roots[0]
    marker = tmp_path / "PWNED"
    evil = root / f"evil-{tmp_path.name}"
    evil_adapter(root / "good", evil, marker)

    before = counts(url)
    r = alice.post("/v1/adapters", json={"name": "evil", "source": str(evil)})
    assert not marker.exists()
    # The API has no torch: the pickle's opcodes are read (never run) and its import of
    # os.mkdir refuses the registration; nothing is stored.
    assert r.status_code == 422, r.text
    assert "adapter_model.bin" in r.text and "mkdir" in r.text, r.text
    assert counts(url) == before
    # the worker's engine refuses it by the same rule, and still never runs the payload
    from lorry.engine import LoRAError, LoRARequest

    eng = engine_for(settings)
    with pytest.raises(LoRAError, match="adapter_model.bin is a pickle that imports"):
        eng.add_lora(LoRARequest("evil", 99, str(evil)))
    assert not marker.exists()
    # a job naming it is refused too: the adapter was never registered
    r = alice.post("/v1/jobs", json={"prompt": "hi", "adapter": "evil",
                                     "sampling": {"max_tokens": 2}})
    assert r.status_code in (404, 422), r.text
    assert counts(url) == before
    assert not marker.exists()


def test_prompt_longer_than_max_model_len_is_refused_with_the_reason(service, alice):
    """The API counts the prompt with the base tokenizer: 422 naming count and limit, no row."""
    _app, queue, settings, url = service
    before = counts(url)
    # byte-level tiny tokenizer: 300 bytes + BOS; messages count a lower bound (content - 2)
    for body, count in (({"prompt": "z" * 300}, 301),
                        ({"messages": [{"role": "user", "content": "z" * 300}]}, 298)):
        r = alice.post("/v1/jobs", json={**body, "sampling": {"max_tokens": 2}})
        assert r.status_code == 422, r.text
        assert f"{count} tokens; max_model_len is 128" in r.json()["error"]["message"], r.text
    assert counts(url) == before
    ok_job = alice.post("/v1/jobs", json={"prompt": "short", "sampling": {"max_tokens": 2}}).json()
    Drainer(queue, engine_for(settings), "sec-worker", max_num_seqs=4).run(max_seconds=60)
    assert alice.get(f"/v1/jobs/{ok_job['id']}").json()["status"] == "succeeded"


def test_batch_line_longer_than_max_model_len_is_a_line_error(service, alice):
    """A too-long batch line is reported on its line; the other lines are queued."""
    import json

    _app, _queue, _settings, url = service

    def line(cid, prompt):
        return json.dumps({"custom_id": cid, "method": "POST", "url": "/v1/completions",
                           "body": {"model": "base", "prompt": prompt, "max_tokens": 2}})
    before = counts(url)
    r = alice.post("/v1/batches", content="\n".join([line("a", "short"), line("b", "z" * 300)]))
    assert r.status_code == 201, r.text
    [err] = r.json()["errors"]["data"]
    assert err["line"] == 2 and err["code"] == "context_length_exceeded", err
    assert "max_model_len is 128" in err["message"], err
    assert counts(url)["jobs"] == before["jobs"] + 1
    only_long = alice.post("/v1/batches", content=line("c", "z" * 300))
    assert only_long.status_code == 400 and "max_model_len" in only_long.text, only_long.text


def test_max_tokens_past_max_model_len_is_refused_not_cut_short(service, alice):
    """A prompt that fits but asks for more tokens than the context has left (vLLM's server
    rule): 422 (400 on OpenAI's routes) context_length_exceeded naming max_tokens and how
    many fit, no row; a request
    that does not name max_tokens is not checked against it."""
    import json

    _app, _queue, _settings, url = service
    before = counts(url)
    prompt = "z" * 99          # 100 tokens with BOS: 28 fit in max_model_len 128
    for path, body, param in (
            ("/v1/jobs", {"prompt": prompt, "sampling": {"max_tokens": 29}},
             "sampling.max_tokens"),
            ("/v1/completions", {"model": "base", "prompt": prompt, "max_tokens": 29},
             "max_tokens"),
            ("/v1/chat/completions", {"model": "base", "max_completion_tokens": 500,
                                      "messages": [{"role": "user", "content": prompt}]},
             "max_completion_tokens")):
        r = alice.post(path, json=body)
        assert r.status_code == (422 if path == "/v1/jobs" else 400), (path, r.text)
        err = r.json()["error"]
        assert (err["code"], err["param"]) == ("context_length_exceeded", param), err
        assert "max_model_len 128" in err["message"] and "at most" in err["message"], err
    assert counts(url) == before
    line = {"custom_id": "x", "method": "POST", "url": "/v1/completions",
            "body": {"model": "base", "prompt": prompt, "max_tokens": 29}}
    ok = {**line, "custom_id": "y", "body": {**line["body"], "max_tokens": 28}}
    r = alice.post("/v1/batches", content="\n".join(map(json.dumps, [line, ok])))
    assert r.status_code == 201, r.text
    [err] = r.json()["errors"]["data"]
    assert (err["line"], err["code"], err["param"]) == (1, "context_length_exceeded",
                                                        "body.max_tokens"), err
    assert "ask for at most 28 tokens" in err["message"], err
    r = alice.post("/v1/jobs", json={"prompt": prompt, "sampling": {"max_tokens": 28}})
    assert r.status_code == 201, r.text
    r = alice.post("/v1/jobs", json={"prompt": "z" * 120})   # max_tokens not named: queued
    assert r.status_code == 201, r.text


# ---- hand-made pickles ------------------------------------------------------------------------

def _s(text: str) -> bytes:
    """BINUNICODE (an opcode torch's weights-only loader runs)."""
    data = text.encode()
    return pickle.BINUNICODE + struct.pack("<I", len(data)) + data


def _put(i: int) -> bytes:
    return pickle.BINPUT + bytes([i])


def _get(i: int) -> bytes:
    return pickle.BINGET + bytes([i])


def _state_dict_with(value: bytes) -> bytes:
    """{'w': <value>} as a protocol-2 stream; ``value`` pushes one object."""
    return pickle.PROTO + b"\x02" + pickle.EMPTY_DICT + _s("w") + value + pickle.SETITEM \
        + pickle.STOP


def _mkdir_call(push_callable: bytes, marker) -> bytes:
    """<callable>(marker): with os.mkdir as the callable, running it creates ``marker``."""
    return push_callable + _s(str(marker)) + pickle.TUPLE1 + pickle.REDUCE


def _decoy_pop(marker) -> bytes:
    # the last strings before STACK_GLOBAL name an allowed global; POP leaves os/mkdir below
    names = _s("os") + _s("mkdir") + _s("torch") + _s("FloatStorage") + pickle.POP + pickle.POP
    return _state_dict_with(_mkdir_call(names + pickle.STACK_GLOBAL, marker))


def _decoy_pop_mark(marker) -> bytes:
    names = _s("os") + _s("mkdir") + pickle.MARK + _s("torch._utils") \
        + _s("_rebuild_tensor_v2") + pickle.POP_MARK
    return _state_dict_with(_mkdir_call(names + pickle.STACK_GLOBAL, marker))


def _memo_swap(marker) -> bytes:
    # names stored out of order in the memo, fetched in the executed order, and decoys fetched
    # last (the most recent strings) then dropped
    store = _s("mkdir") + _put(0) + pickle.POP + _s("os") + _put(1) + pickle.POP \
        + _s("torch") + _put(2) + pickle.POP + _s("FloatStorage") + _put(3) + pickle.POP
    fetch = _get(1) + _get(0) + _get(2) + _get(3) + pickle.POP + pickle.POP
    stream = _state_dict_with(_mkdir_call(fetch + pickle.STACK_GLOBAL, marker))
    return stream[:2] + store + stream[2:]


def _memo_alias_dup(marker) -> bytes:
    # one memo slot written twice: the module name it holds at STACK_GLOBAL time is 'os'
    names = _s("torch") + _put(0) + pickle.POP + _s("os") + _put(0) + pickle.POP \
        + _get(0) + pickle.DUP + pickle.POP + _s("mkdir")
    return _state_dict_with(_mkdir_call(names + pickle.STACK_GLOBAL, marker))


def _inst(marker) -> bytes:
    # INST: a class (here a function) named inline, called on the items above MARK
    return _state_dict_with(pickle.MARK + pickle.UNICODE + f"{marker}\n".encode()
                            + pickle.INST + b"os\nmkdir\n")


def _obj(marker) -> bytes:
    return _state_dict_with(pickle.MARK + pickle.GLOBAL + b"os\nmkdir\n" + _s(str(marker))
                            + pickle.OBJ)


def _global_reduce(marker) -> bytes:
    # only opcodes torch's loader runs: the import itself is what is refused
    return _state_dict_with(_mkdir_call(pickle.GLOBAL + b"os\nmkdir\n", marker))


def _protocol(n: int):
    return lambda marker: pickle.dumps({"w": Payload(str(marker))}, protocol=n)


CRAFTED = {"decoy_pop": _decoy_pop, "decoy_pop_mark": _decoy_pop_mark, "memo_swap": _memo_swap,
           "memo_alias_dup": _memo_alias_dup, "inst": _inst, "obj": _obj,
           "global_reduce": _global_reduce,
           **{f"protocol_{n}": _protocol(n) for n in range(6)}}


def torch_zip(path, data_pkl: bytes, archive: str = "archive", extra=()) -> None:
    """A file laid out as torch.save writes it, with ``data_pkl`` as its pickle."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
        zf.writestr(f"{archive}/data.pkl", data_pkl)
        zf.writestr(f"{archive}/byteorder", b"little")
        zf.writestr(f"{archive}/version", b"3\n")
        for name, data in extra:
            zf.writestr(name, data)


def torch_refuses(path) -> bool:
    """Whether torch.load(weights_only=True) raises (its warnings, e.g. about a protocol other
    than 2, are not refusals)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception:  # noqa: BLE001 - any refusal counts; none may run the payload
            return True
    return False


@pytest.mark.parametrize("attack", sorted(CRAFTED))
def test_code_hidden_from_a_name_scan_is_refused_and_never_runs(attack, tmp_path):
    live, marker = tmp_path / "live", tmp_path / "PWNED"
    pickle.loads(CRAFTED[attack](live))  # proves the attack runs when unpickled
    assert live.is_dir()
    stream = CRAFTED[attack](marker)
    found = scan_pickle(stream)
    # the import is resolved from the simulated stack and memo, not from the recent strings
    assert any(g.endswith(".mkdir") for g in found.imports), found
    assert "torch.FloatStorage" not in found.imports
    bin_ = tmp_path / "adapter_model.bin"
    torch_zip(bin_, stream)
    assert not scan_checkpoint(bin_).ok
    assert torch_refuses(bin_)
    raw = tmp_path / "raw.bin"  # the bare stream: torch.load reads it as its legacy format
    raw.write_bytes(stream)
    assert not scan_checkpoint(raw).ok and torch_refuses(raw)
    assert not marker.exists()


def _clean_state_dict() -> dict:
    return {"a": torch.randn(4, 2), "b": torch.randn(3).half()}


def _saved(tmp_path, obj, name="x.bin", **kw):
    path = tmp_path / name
    torch.save(obj, str(path), **kw)
    return path


def _members(path) -> list[tuple[str, bytes]]:
    with zipfile.ZipFile(path) as zf:
        return [(n, zf.read(n)) for n in zf.namelist()]


def _rezip(path, members) -> None:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
        for name, data in members:
            zf.writestr(name, data)


def test_a_compressed_storage_that_would_inflate_to_gigabytes_is_refused(tmp_path):
    """A 3 MB .bin whose one storage is deflated zeros took torch.load (and the worker) from
    222 MB to 3.2 GB: torch.save writes members uncompressed, so a compressed one is refused
    before torch reads it; the same archive stored plainly is accepted."""
    clean = _saved(tmp_path, _clean_state_dict())
    assert scan_checkpoint(clean).ok
    bomb = tmp_path / "bomb.bin"
    with zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in _members(clean):
            zf.writestr(name, data)
    found = scan_checkpoint(bomb)
    assert not found.ok and any("is compressed" in p for p in found.problems), found
    stored = tmp_path / "stored.bin"
    _rezip(stored, _members(clean))
    assert scan_checkpoint(stored).ok


def test_a_second_pickle_in_the_archive_is_refused(tmp_path):
    """torch reads only '<archive>/data.pkl'; any other pickle member, at any path, is refused
    (torch.save never writes one) and is never run."""
    marker = tmp_path / "PWNED"
    clean = _saved(tmp_path, _clean_state_dict())
    archive = _members(clean)[0][0].split("/")[0]
    evil = pickle.dumps({"w": Payload(str(marker))}, protocol=2)
    for i, name in enumerate([f"{archive}/extra/evil.pkl", f"{archive}/data/0/../evil.pkl",
                              f"{archive}/DATA.PKL", "other/data.pkl"]):
        path = tmp_path / f"nested{i}.bin"
        _rezip(path, [*_members(clean), (name, evil)])
        found = scan_checkpoint(path)
        assert not found.ok and any(name in p for p in found.problems), (name, found)
        torch_refuses(path)  # torch ignores the member; it must not run it either
    assert not marker.exists()


def test_the_pickle_torch_reads_is_the_one_scanned(tmp_path):
    """torch takes the first member's folder as the archive: a payload archive placed first
    is what torch would read, and the scan reads the same one; a legacy pickle followed by a
    clean zip (zipfile sees the zip, torch the pickle) is refused as not torch's zip format."""
    marker = tmp_path / "PWNED"
    evil = pickle.dumps({"w": Payload(str(marker))}, protocol=2)
    clean = _saved(tmp_path, _clean_state_dict())
    first = tmp_path / "first.bin"
    _rezip(first, [("evil/data.pkl", evil), ("evil/version", b"3\n"), *_members(clean)])
    found = scan_checkpoint(first)
    assert any(g.endswith(".mkdir") for g in found.imports), found
    assert torch_refuses(first)
    polyglot = tmp_path / "polyglot.bin"
    polyglot.write_bytes(evil + clean.read_bytes())
    assert zipfile.is_zipfile(polyglot)  # what a name scan of the zip's members would read
    found = scan_checkpoint(polyglot)
    assert any(g.endswith(".mkdir") for g in found.imports), found
    assert "not torch's zip format" in found.describe()
    assert torch_refuses(polyglot)
    dup = tmp_path / "dup.bin"
    members = _members(clean)
    with pytest.warns(UserWarning, match="Duplicate name"):
        _rezip(dup, [(members[0][0], evil), *members])
    assert "names a member twice" in scan_checkpoint(dup).describe()
    assert not marker.exists()


class TaggedTensor(torch.Tensor):
    """A tensor subclass: torch.save records its class, which torch's loader refuses."""


REFUSED_BY_TORCH = {
    "function": {"w": torch.ones(2), "f": print},
    "module": {"w": torch.nn.Linear(2, 2)},
    "date": {"w": torch.ones(2), "d": datetime.date(2020, 1, 1)},
    "partial": {"w": functools.partial(print, 1)},
    "class": {"w": Payload},
    "tensor_subclass": {"w": torch.ones(2).as_subclass(TaggedTensor)},
    "counter_of_code": {"w": collections.Counter({"x": 1}), "p": Payload},
}


@pytest.mark.parametrize("case", sorted(REFUSED_BY_TORCH))
def test_what_torch_refuses_the_scan_refuses(case, tmp_path):
    path = _saved(tmp_path, REFUSED_BY_TORCH[case])
    assert torch_refuses(path)
    assert not scan_checkpoint(path).ok


def test_no_mutant_the_scan_accepts_is_refused_by_torch(tmp_path):
    """Byte mutations of a real checkpoint's pickle: every one the scan accepts, torch loads."""
    base = _saved(tmp_path, collections.OrderedDict(
        [("a", torch.randn(3, 2)), ("b", torch.randn(4, 4)[:, 1:3].bfloat16()),
         ("c", torch.nn.Parameter(torch.randn(2)))]))
    members = _members(base)
    pkl = next(i for i, (n, _) in enumerate(members) if n.endswith("/data.pkl"))
    rng, accepted = random.Random(7), 0
    for _ in range(400):
        data = bytearray(members[pkl][1])
        for _ in range(rng.randint(1, 3)):
            i = rng.randrange(len(data))
            if rng.random() < 0.7:
                data[i] = rng.randrange(256)
            else:
                data[i:i] = data[rng.randrange(len(data)):][:rng.randint(1, 8)]
        path = tmp_path / "mutant.bin"
        _rezip(path, [(n, bytes(data) if k == pkl else d) for k, (n, d) in enumerate(members)])
        if scan_checkpoint(path).ok:
            accepted += 1
            assert not torch_refuses(path), bytes(data)
    assert accepted > 0  # some mutants (changed values, not structure) stay acceptable


def test_real_state_dicts_are_accepted(tmp_path):
    """What torch.save writes for a state dict of fp32/fp16/bf16 tensors: plain dict,
    OrderedDict, nn.Module.state_dict() (with its _metadata), parameters, strided views,
    protocol 2 (the default) and 3."""
    tensors = {"a": torch.randn(3, 4), "b": torch.randn(2, 2).half(),
               "c": torch.randn(5).bfloat16(), "d": torch.randn(6, 6)[1:, ::2],
               "e": torch.nn.Parameter(torch.randn(3)), "f": torch.zeros(0, 4)}
    module = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    cases = {"dict": tensors, "ordered": collections.OrderedDict(tensors),
             "module": module.state_dict(), "module_bf16": module.bfloat16().state_dict()}
    for name, obj in cases.items():
        for protocol in (2, 3):
            path = _saved(tmp_path, obj, f"{name}-{protocol}.bin", pickle_protocol=protocol)
            found = scan_checkpoint(path)
            assert found.ok, (name, protocol, found)
            assert not torch_refuses(path)
            # the shapes and bytes torch.load would give, read from the opcodes alone
            with warnings.catch_warnings():   # protocol 3: a warning, not a refusal
                warnings.simplefilter("ignore")
                loaded = torch.load(path, weights_only=True)
            assert found.shapes == {k: tuple(v.shape) for k, v in loaded.items()}
            assert found.tensor_bytes == sum(v.numel() * v.element_size()
                                             for v in loaded.values())


def test_a_tensor_of_more_than_four_dimensions_is_refused(tmp_path):
    """Shapes are multiplied to count a .bin's bytes: a size tuple of 400k entries made that
    quadratic (a review); adapters' tensors have 1 or 2 dimensions."""
    path = _saved(tmp_path, {"a": torch.zeros(1, 1, 1, 1, 2)}, "five.bin")
    found = scan_checkpoint(path)
    assert not found.ok and not torch_refuses(path)
    assert scan_checkpoint(_saved(tmp_path, {"a": torch.zeros(1, 1, 1, 2)}, "four.bin")).ok


def _peft_bin_adapter(tiny_model, out_dir):
    """A PEFT LoRA adapter saved by PEFT itself as adapter_model.bin (torch.save)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(tiny_model), dtype=torch.float32)
    model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"],
                                            lora_dropout=0.0, task_type="CAUSAL_LM"))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    model.save_pretrained(str(out_dir), safe_serialization=False)
    assert (out_dir / "adapter_model.bin").is_file()
    assert not (out_dir / "adapter_model.safetensors").exists()
    return out_dir


def test_peft_bin_adapter_registers_and_serves_like_its_safetensors_twin(service, alice, roots):
    """A .bin adapter PEFT wrote is accepted at registration and served by the engine with the
    same tokens as the same weights in safetensors."""
    from safetensors.torch import save_file

    from lorry.engine import LoRARequest, SamplingParams

    _app, _queue, settings, _url = service
    root = roots[0]
    bin_dir = root / "peft-bin"
    if not bin_dir.exists():
        _peft_bin_adapter(settings.model, bin_dir)
    twin = root / "peft-bin-twin"
    if not twin.exists():
        twin.mkdir()
        shutil.copy(bin_dir / "adapter_config.json", twin / "adapter_config.json")
        state = torch.load(str(bin_dir / "adapter_model.bin"), weights_only=True)
        save_file({k: v.contiguous() for k, v in state.items()},
                  str(twin / "adapter_model.safetensors"))
    r = alice.post("/v1/adapters", json={"name": "peft-bin", "source": str(bin_dir)})
    assert r.status_code == 201, r.text
    assert r.json()["rank"] == 8
    eng = engine_for(settings)
    sp = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    outs = eng.generate(["hello there", "hello there", "hello there"], sp,
                        lora_request=[LoRARequest("bin", 1, str(bin_dir)),
                                      LoRARequest("st", 2, str(twin)), None], use_tqdm=False)
    assert outs[0].outputs[0].token_ids == outs[1].outputs[0].token_ids
    assert outs[0].outputs[0].token_ids != outs[2].outputs[0].token_ids  # the adapter matters


@pytest.mark.parametrize("attack", ["decoy_pop", "memo_swap", "inst", "protocol_4"])
def test_api_and_engine_refuse_hidden_code_in_an_adapter(service, alice, roots, tmp_path, attack):
    _app, _queue, settings, url = service
    root = roots[0]
    marker = tmp_path / "PWNED"
    evil = root / f"hidden-{attack}-{tmp_path.name}"
    evil.mkdir()
    shutil.copy(root / "good" / "adapter_config.json", evil / "adapter_config.json")
    torch_zip(evil / "adapter_model.bin", CRAFTED[attack](marker))
    before = counts(url)
    r = alice.post("/v1/adapters", json={"name": "hidden", "source": str(evil)})
    assert r.status_code == 422, r.text
    assert "adapter_model.bin is a pickle that imports" in r.text and "mkdir" in r.text, r.text
    assert counts(url) == before
    with pytest.raises(LoRAError, match="mkdir"):
        parse_adapter(evil, read_base_config(settings.model))  # the engine's check at load
    assert not marker.exists()


def test_a_bin_rewritten_in_place_after_its_scan_is_scanned_again_as_loaded(roots,
                                                                            tiny_model,
                                                                            tmp_path):
    """parse_adapter scanned the file, torch.load read it again by name: a .bin rewritten in
    place in between (a compressed bomb) was loaded unscanned. The bytes loaded are read once
    and scanned."""
    from safetensors.torch import load_file

    from lorry.engine.lora.weights import load_adapter_weights

    root, _ = roots
    adapter = tmp_path / "adapter"
    shutil.copytree(root / "good", adapter)
    weights = adapter / "adapter_model.safetensors"
    torch.save(load_file(str(weights)), str(adapter / "adapter_model.bin"))
    weights.unlink()
    base = read_base_config(tiny_model)
    spec = parse_adapter(adapter, base)
    members = _members(adapter / "adapter_model.bin")
    with zipfile.ZipFile(adapter / "adapter_model.bin", "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in members:   # the same tensors, compressed: the scan refuses them
            zf.writestr(name, data)
    with pytest.raises(LoRAError, match="is compressed") as e:
        load_adapter_weights(spec, base, 16, torch.float32, False)
    assert str(adapter) in str(e.value)
