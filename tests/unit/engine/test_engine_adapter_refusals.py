"""Every adapter refusal names the problem, and a refused adapter changes no cache."""
from __future__ import annotations

import json
import shutil
import sys

import pytest

from lorry.engine.errors import (
    AdapterFormatError,
    AdapterNotFoundError,
    BaseModelMismatchError,
    LoRAError,
    RankTooLargeError,
    UnsupportedAdapterError,
)
from lorry.engine.lora.spec import parse_adapter, read_base_config


@pytest.fixture()
def adapter(tiny_llama, tmp_path):
    """A writable copy of a valid all-linear adapter (rank 4 with rslora)."""
    dst = tmp_path / "adapter"
    shutil.copytree(tiny_llama.adapters["all_r4_rslora"], dst)
    return dst


def _edit_config(path, **changes):
    cfg = json.loads((path / "adapter_config.json").read_text())
    cfg.update(changes)
    (path / "adapter_config.json").write_text(json.dumps(cfg))


def _parse(path, base, max_lora_rank=64, **kw):
    return parse_adapter(path, read_base_config(base.dir), max_lora_rank=max_lora_rank, **kw)


def test_valid_adapter_parses_without_torch_reading_tensors(adapter, tiny_llama):
    spec = _parse(adapter, tiny_llama)
    assert spec.max_rank == 4 and len(spec.target_modules) == 7
    assert all(abs(s - 8 / 2) < 1e-9 for *_, s, _t in spec.modules.values())  # alpha/sqrt(r)


def test_spec_module_does_not_import_torch():
    import subprocess

    code = "import sys, engine.lora.spec, engine; engine.LoRARequest; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


@pytest.mark.parametrize("changes, error, words", [
    ({"use_dora": True}, AdapterFormatError, "DoRA magnitude vectors"),
    ({"use_dora": True, "lora_bias": True}, UnsupportedAdapterError, "DoRA .* with lora_bias"),
    ({"bias": "some"}, UnsupportedAdapterError, "bias='some'"),
    ({"modules_to_save": ["lm_head", "score"]}, UnsupportedAdapterError, "modules_to_save"),
    ({"target_modules": ["q_proj", "wte"]}, BaseModelMismatchError, "wte"),
    ({"target_modules": ["q_proj", "c_attn"]}, BaseModelMismatchError, "c_attn"),
    ({"peft_type": "IA3"}, UnsupportedAdapterError, "IA3"),
    ({"r": 0}, AdapterFormatError, "r=0"),
])
def test_unsupported_config_is_refused(adapter, tiny_llama, changes, error, words):
    _edit_config(adapter, **changes)
    with pytest.raises(error, match=words):
        _parse(adapter, tiny_llama)


def test_rank_above_max_lora_rank_is_refused(tiny_llama):
    with pytest.raises(RankTooLargeError, match=r"rank 16 .*max_lora_rank=8"):
        _parse(tiny_llama.adapters["mlp_r16"], tiny_llama, max_lora_rank=8)


def test_shapes_of_another_base_are_refused(adapter, tiny_qwen2, tmp_path):
    from lorry.testing import make_tiny_llama

    other = make_tiny_llama(tmp_path / "wide", hidden_size=96, num_heads=4, num_kv_heads=2)
    with pytest.raises(BaseModelMismatchError, match="do not fit the base"):
        parse_adapter(adapter, read_base_config(other), max_lora_rank=64)


def test_layer_missing_in_base_is_refused(adapter, tmp_path):
    from lorry.testing import make_tiny_llama

    shallow = make_tiny_llama(tmp_path / "shallow", num_layers=1)
    with pytest.raises(BaseModelMismatchError, match="layer 1 does not exist"):
        parse_adapter(adapter, read_base_config(shallow))


def test_missing_files_are_refused(adapter, tiny_llama, tmp_path):
    with pytest.raises(AdapterNotFoundError, match="adapter_config.json not found"):
        _parse(tmp_path / "nothing", tiny_llama)
    (adapter / "adapter_model.safetensors").unlink()
    with pytest.raises(AdapterNotFoundError, match="adapter_model.safetensors"):
        _parse(adapter, tiny_llama)


def test_corrupt_files_are_refused(adapter, tiny_llama):
    weights = adapter / "adapter_model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])  # truncated download
    with pytest.raises(AdapterFormatError, match="corrupt safetensors"):
        _parse(adapter, tiny_llama)
    weights.write_bytes(b"\xff" * 64)
    with pytest.raises(AdapterFormatError, match="corrupt safetensors"):
        _parse(adapter, tiny_llama)
    (adapter / "adapter_config.json").write_text("{not json")
    with pytest.raises(AdapterFormatError, match="adapter_config.json is unreadable"):
        _parse(adapter, tiny_llama)


@pytest.mark.parametrize("changes, words", [
    ({"target_modules": 123}, "target_modules=123 must be a list of module names or a"),
    ({"target_modules": ["q_proj", 7]}, "target_modules=.* must be a list of module names"),
    ({"modules_to_save": "lm_head"}, "modules_to_save='lm_head' must be a list of module"),
    ({"modules_to_save": {"lm_head": 1}}, "modules_to_save=.* must be"),
    ({"lora_alpha": "8"}, "lora_alpha='8' must be a number"),
    ({"lora_alpha": True}, "lora_alpha=True must be a number"),
    ({"rank_pattern": {"[": 4}}, "rank_pattern key '\\[' has '\\[' at 0: allowed are"),
    # valid alone, not inside PEFT's (.*\.)?(key)$; a nested repetition that would backtrack
    # for minutes over one module name; a back-reference
    ({"rank_pattern": {"(?i)q_proj": 4}}, "after no single character"),
    ({"rank_pattern": {"(.|.)*z": 4}}, "after no single character"),
    ({"alpha_pattern": {"(a)(b)\\2": 4}}, "allowed are"),
    ({"rank_pattern": {"a*b*c*d*": 4}}, "more than 3 of"),
    ({"rank_pattern": ["q_proj"]}, "rank_pattern=.* must be an object"),
    ({"rank_pattern": {"q_proj": "4"}}, "rank_pattern=.* to ranks"),
    ({"alpha_pattern": {"q_proj": [1]}}, "alpha_pattern=.* to numbers"),
    ({"alpha_pattern": {"q_proj(": 1}}, "alpha_pattern key .* is not a regular expression"),
    ({"rank_pattern": {"x" * 257: 4}}, "must have 1 to 256 characters"),
    ({"bias": ["none"]}, "bias=.* must be a string"),
    ({"init_lora_weights": {"x": 1}}, "init_lora_weights=.* must be a bool or a string"),
    # a hostile-tenant audit: an int past float's range was an OverflowError (500); "false"
    # read as true; 78k pattern keys held a thread 26 s
    ({"lora_alpha": 10**400}, "lora_alpha=.* must be a number"),
    ({"alpha_pattern": {"q_proj": -10**400}}, "alpha_pattern=.* to numbers"),
    ({"fan_in_fan_out": "false"}, "fan_in_fan_out='false' must be true or false"),
    ({"use_rslora": [1]}, "use_rslora=\\[1\\] must be true or false"),
    ({"use_dora": 1}, "use_dora=1 must be true or false"),
    ({"rank_pattern": {f"z{i}": 4 for i in range(2049)}},
     "rank_pattern has 2049 keys; at most 2048 are read"),
])
def test_config_fields_of_the_wrong_type_are_refused_by_name(adapter, tiny_llama, changes,
                                                             words):
    """Malformed fields are refused as the adapter's fault (the API answers 422), never a
    TypeError or re.error from deeper in the checks (a 500 before)."""
    _edit_config(adapter, **changes)
    with pytest.raises(AdapterFormatError, match=words):
        _parse(adapter, tiny_llama)


def test_deeply_nested_or_odd_json_is_refused(adapter, tiny_llama):
    (adapter / "adapter_config.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(AdapterFormatError, match="adapter_config.json is nested too deeply"):
        _parse(adapter, tiny_llama)
    (adapter / "adapter_config.json").write_text(json.dumps({"r": 4, "target_modules": ["q_proj"]}))
    weights = adapter / "adapter_model.safetensors"
    for header in (b"[" * 50_000 + b"]" * 50_000, b"[1, 2]",
                   json.dumps({"x": {"dtype": "F32", "shape": "4", "data_offsets": [0, 0]}}).encode(),
                   json.dumps({"x": {"dtype": "F32", "shape": [4], "data_offsets": [0]}}).encode(),
                   json.dumps({"x": [1]}).encode()):
        weights.write_bytes(len(header).to_bytes(8, "little") + header)
        with pytest.raises(AdapterFormatError, match="corrupt safetensors"):
            _parse(adapter, tiny_llama)


def test_a_safetensors_header_far_past_an_adapters_size_is_refused_unread(adapter, tiny_llama):
    """A header of 16 MiB or more is refused before it is read or parsed (95 MB of entries
    held an API thread 9.6 s and 1.1 GB: a hostile-tenant audit)."""
    weights = adapter / "adapter_model.safetensors"
    n = 17 * 1024 * 1024
    with open(weights, "wb") as f:
        f.write(n.to_bytes(8, "little"))
        f.truncate(8 + n)                      # sparse: a header length the file holds
    with pytest.raises(AdapterFormatError, match="header of 17825792 bytes: an adapter's"):
        _parse(adapter, tiny_llama)


def test_a_tensor_whose_bytes_do_not_match_its_shape_is_refused_at_registration(adapter,
                                                                                tiny_llama):
    """Accepted at registration before (201); the load then failed on the worker."""
    weights = adapter / "adapter_model.safetensors"
    raw = weights.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    name = next(k for k in header if k != "__metadata__")
    start, end = header[name]["data_offsets"]
    header[name]["shape"] = [header[name]["shape"][0], header[name]["shape"][1] // 2]
    new = json.dumps(header).encode().ljust(n)
    weights.write_bytes(len(new).to_bytes(8, "little") + new + raw[8 + n:])
    with pytest.raises(AdapterFormatError, match=f"tensor '{name}' holds {end - start} bytes"):
        _parse(adapter, tiny_llama)


def test_a_tensor_of_many_dimensions_is_refused_before_its_size_is_multiplied(adapter,
                                                                            tiny_llama):
    """A shape of 800,000 threes made the byte check's product take 19 s (a review)."""
    weights = adapter / "adapter_model.safetensors"
    for shape in ([3] * 5, [3] * 800_000, [2**64, 1]):
        header = json.dumps({"x": {"dtype": "F32", "shape": shape,
                                   "data_offsets": [0, 0]}}).encode()
        weights.write_bytes(len(header).to_bytes(8, "little") + header)
        with pytest.raises(AdapterFormatError, match="at most 4 dimensions"):
            _parse(adapter, tiny_llama)


def test_many_pattern_keys_within_the_limit_resolve_as_peft(adapter, tiny_llama):
    _edit_config(adapter, alpha_pattern={f"model.layers.{i}.self_attn.v_proj": 2
                                         for i in range(2000)})
    spec = _parse(adapter, tiny_llama)
    scale = {key: s for key, (*_, s, _t) in spec.modules.items()}
    assert scale[(0, "v_proj")] == 2 / 2 and scale[(0, "q_proj")] == 8 / 2   # rsLoRA, r 4


def test_bin_adapter_is_loaded_without_unpickling_objects(adapter, tiny_llama, tmp_path):
    import pickle

    import torch
    from safetensors.torch import load_file

    from lorry.engine.lora.weights import load_adapter_weights

    weights = adapter / "adapter_model.safetensors"
    torch.save(load_file(str(weights)), adapter / "adapter_model.bin")
    weights.unlink()
    cfg = read_base_config(tiny_llama.dir)
    spec = _parse(adapter, tiny_llama)
    loaded = load_adapter_weights(spec, cfg, 64, torch.float32, pin_memory=False)
    assert len(loaded.tensors) == 14

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    (adapter / "adapter_model.bin").write_bytes(pickle.dumps({"x": Evil()}))
    with pytest.raises(UnsupportedAdapterError, match="imports builtins.print"):
        _parse(adapter, tiny_llama)  # refused from the opcodes alone, torch-free
    # a file swapped after validation is never unpickled: the bytes loaded are scanned
    # first (and torch.load's weights_only stands behind that)
    with pytest.raises(UnsupportedAdapterError, match="imports builtins.print"):
        load_adapter_weights(spec, cfg, 64, torch.float32, False)


def test_a_bin_of_the_wrong_shapes_or_size_is_refused_before_its_tensors_are_read(
        adapter, tiny_llama, monkeypatch):
    """The shapes a .bin's pickle declares are checked at registration and again before the
    worker reads the file, and a file bigger than its tensors is never read: a 4 GB lora_A
    took a worker to 8 GB before the shape check refused it, a valid .bin swapped for a
    3 GiB file to 3.5 GB (a hostile-tenant audit)."""
    import torch
    from safetensors.torch import load_file

    from lorry.engine.lora.weights import load_adapter_weights

    weights = adapter / "adapter_model.safetensors"
    good = load_file(str(weights))
    weights.unlink()
    bin_ = adapter / "adapter_model.bin"
    torch.save(good, bin_)
    cfg = read_base_config(tiny_llama.dir)
    spec = _parse(adapter, tiny_llama)                    # registered while it was good
    name = next(k for k in good if "lora_A" in k)
    wide = {**good, name: torch.zeros(good[name].shape[0], 100_000)}
    torch.save(wide, bin_)
    with pytest.raises(BaseModelMismatchError, match="do not fit the base"):
        _parse(adapter, tiny_llama)                       # at registration now (201 before)
    # a tensor that is a small view of a big storage: torch.save writes the whole storage
    big = torch.zeros(2_000_000)
    torch.save({**good, name: big[:good[name].numel()].view(good[name].shape)}, bin_)
    with pytest.raises(AdapterFormatError, match="bytes, but the tensors its pickle names"):
        _parse(adapter, tiny_llama)

    def no_load(*a, **kw):
        raise AssertionError("torch.load reached")
    monkeypatch.setattr(torch, "load", no_load)
    with pytest.raises(AdapterFormatError, match="bytes, but the tensors its pickle names"):
        load_adapter_weights(spec, cfg, 64, torch.float32, pin_memory=False)
    torch.save(wide, bin_)
    with pytest.raises(BaseModelMismatchError, match="do not fit the base"):
        load_adapter_weights(spec, cfg, 64, torch.float32, pin_memory=False)


def test_engine_refusal_leaves_caches_unchanged(adapter, tiny_llama):
    from lorry.engine import EngineConfig, LLMEngine, LoRARequest, SamplingParams

    eng = LLMEngine(EngineConfig(model=str(tiny_llama.dir), max_loras=2, max_lora_rank=8))
    before = eng.cache_stats()
    _edit_config(adapter, use_dora=True)
    bad = LoRARequest("dora", 7, str(adapter))
    with pytest.raises(LoRAError, match="DoRA"):
        eng.add_lora(bad)
    with pytest.raises(LoRAError, match="DoRA"):
        eng.generate(["hi", "there"], SamplingParams(max_tokens=2),
                     [None, bad], use_tqdm=False)
    after = eng.cache_stats()
    # the plain row ran (step counters moved); adapter caches unchanged, every KV block back
    assert after.pop("steps")["prefill"]["steps"] >= before.pop("steps")["prefill"]["steps"]
    kv, kv_before = after.pop("kv"), before.pop("kv")
    assert kv["blocks_free"] == kv_before["blocks_free"] - kv["blocks_cached"]
    assert after == before
    assert eng.list_loras() == {"gpu": [], "cpu": [], "pinned": []}
    assert not eng.has_unfinished_requests()
    with pytest.raises(RankTooLargeError):
        eng.add_lora(LoRARequest("big", 8, str(tiny_llama.adapters["mlp_r16"])))
    with pytest.raises(AdapterNotFoundError, match="no such directory"):
        eng.add_lora(LoRARequest("gone", 9, "/nonexistent/adapter"))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_weights_with_nan_or_infinity_are_refused_and_poison_nobody(adapter, tiny_llama, bad):
    """An adapter whose weights hold NaN or infinity is refused at load with the reason: on
    the torch backend its rows would otherwise turn other adapters' tokens into NaN too."""
    import torch
    from safetensors.torch import load_file, save_file

    from lorry.engine import EngineConfig, LLMEngine, LoRARequest, SamplingParams

    weights = adapter / "adapter_model.safetensors"
    tensors = load_file(str(weights))
    name = next(k for k in sorted(tensors) if "lora_B" in k)
    tensors[name][0, 0] = bad
    save_file(tensors, str(weights))
    eng = LLMEngine(EngineConfig(model=str(tiny_llama.dir), max_loras=2, max_lora_rank=8,
                                 device="cpu", dtype="float32"))
    good = LoRARequest("good", 1, str(tiny_llama.adapters["qv_r8"]))
    sp = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    want = eng.generate([[5, 6, 7]], sp, [good], use_tqdm=False)[0].outputs[0].token_ids
    with pytest.raises(AdapterFormatError, match="NaN or infinite values"):
        eng.add_lora(LoRARequest("bad", 2, str(adapter)))
    assert eng.list_loras()["cpu"] == [1]
    # through the background load: the request ends with the reason, the good one runs on
    eng.add_request("b", [5, 6, 7], sp, LoRARequest("bad", 2, str(adapter)))
    eng.add_request("g", [5, 6, 7], sp, good)
    outs = {}
    while eng.has_unfinished_requests():
        for o in eng.step():
            outs[o.request_id] = o
    assert outs["b"].outputs[0].finish_reason == "error"
    assert "NaN or infinite" in outs["b"].error
    assert outs["g"].outputs[0].token_ids == want
    assert not torch.isnan(eng.loras.gpu.layout.modules[("qkv_proj", 0)].lora_a[0]).any()


def _devices():
    """The CPU always; CUDA (the Triton LoRA kernels and captured decode graphs, where NaN
    fed to ``multinomial`` is a device-side assert that kills the process) where present."""
    import torch
    return ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
        not torch.cuda.is_available(), reason="needs a CUDA device"))]


@pytest.mark.parametrize("device", _devices())
@pytest.mark.parametrize("sampling", [{"temperature": 1.0}, {"temperature": 0.0},
                                      {"temperature": 0.8, "top_p": 0.9, "seed": 3},
                                      {"temperature": 0.0, "logprobs": 2}])
def test_an_adapter_whose_products_overflow_fails_its_request_only(adapter, tiny_llama,
                                                                   sampling, device):
    """Finite weights (accepted at load) whose products overflow float32 give NaN logits: the
    request ends with finish_reason "error" and the reason, the other rows of the step and
    the next steps run on. (It was a RuntimeError out of ``step`` from ``multinomial``, which
    failed every request in the engine; greedy rows "succeeded" with token 0 over and over.)"""
    from safetensors.torch import load_file, save_file

    from lorry.engine import EngineConfig, LLMEngine, LoRARequest, SamplingParams

    weights = adapter / "adapter_model.safetensors"
    save_file({k: v * 1e25 for k, v in load_file(str(weights)).items()}, str(weights))
    eng = LLMEngine(EngineConfig(model=str(tiny_llama.dir), max_loras=2, max_lora_rank=8,
                                 device=device, dtype="float32", max_num_seqs=4))
    good = LoRARequest("good", 1, str(tiny_llama.adapters["qv_r8"]))
    sp = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    prompts = [[5, 6, 7], [9, 10], [11, 12, 13, 14]]
    want = [o.outputs[0].token_ids
            for o in eng.generate(prompts, sp, [good, None, good], use_tqdm=False)]
    bad = LoRARequest("loud", 2, str(adapter))
    outs = eng.generate(prompts + [[5, 6, 7]], [sp, sp, sp, SamplingParams(
        max_tokens=12, ignore_eos=True, **sampling)], [good, None, good, bad], use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs[:3]] == want
    failed = outs[3]
    assert failed.outputs[0].finish_reason == "error" and failed.outputs[0].token_ids == []
    assert "adapter 'loud' produced NaN or infinite logits at output token 1" in failed.error
    assert not eng.has_unfinished_requests()
    assert [o.outputs[0].token_ids
            for o in eng.generate(prompts, sp, [good, None, good], use_tqdm=False)] == want


@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs a CUDA device")
def test_an_adapter_overflowing_bfloat16_on_cuda_fails_its_request_only(adapter, tiny_llama):
    """The production dtype: products past bfloat16's range under one adapter end that
    request with finish_reason "error"; the process survives (no device-side assert), the
    step's other rows finish, and the same batch afterwards gives the tokens it gave before."""
    from safetensors.torch import load_file, save_file

    from lorry.engine import EngineConfig, LLMEngine, LoRARequest, SamplingParams

    weights = adapter / "adapter_model.safetensors"
    save_file({k: v * 1e25 for k, v in load_file(str(weights)).items()}, str(weights))
    eng = LLMEngine(EngineConfig(model=str(tiny_llama.dir), max_loras=2, max_lora_rank=8,
                                 device="cuda", dtype="bfloat16", max_num_seqs=4))
    good = LoRARequest("good", 1, str(tiny_llama.adapters["qv_r8"]))
    sp = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    rand = SamplingParams(max_tokens=12, temperature=1.0, seed=5, ignore_eos=True)
    prompts = [[5, 6, 7], [9, 10], [11, 12, 13, 14]]
    want = [o.outputs[0].token_ids
            for o in eng.generate(prompts, sp, [good, None, good], use_tqdm=False)]
    bad = LoRARequest("loud", 2, str(adapter))
    outs = eng.generate(prompts + [[5, 6, 7], [8, 9]], [sp, sp, sp, rand, sp],
                        [good, None, good, bad, bad], use_tqdm=False)
    assert [(o.outputs[0].finish_reason, len(o.outputs[0].token_ids)) for o in outs[:3]] == [
        ("length", 12)] * 3
    assert [o.outputs[0].finish_reason for o in outs[3:]] == ["error", "error"]
    assert all("adapter 'loud' produced NaN or infinite logits" in o.error for o in outs[3:])
    assert not eng.has_unfinished_requests()
    assert [o.outputs[0].token_ids
            for o in eng.generate(prompts, sp, [good, None, good], use_tqdm=False)] == want


@pytest.mark.parametrize("device", _devices())
def test_the_kv_blocks_an_overflowing_adapter_wrote_poison_no_later_request(adapter,
                                                                           tiny_llama, device):
    """An overflowing adapter's prompts leave NaN keys and values in their KV blocks. Reused
    by a shorter row of a batch, their tail lies past its end, masked; on the torch path 0 x
    NaN was NaN all the same: plain requests of other tenants failed (silently wrong greedy
    tokens before such rows were stopped) in that worker from then on."""
    from safetensors.torch import load_file, save_file

    from lorry.engine import EngineConfig, LLMEngine, LoRARequest, SamplingParams

    weights = adapter / "adapter_model.safetensors"
    save_file({k: v * 1e25 for k, v in load_file(str(weights)).items()}, str(weights))

    def engine():
        return LLMEngine(EngineConfig(model=str(tiny_llama.dir), max_loras=2, max_lora_rank=8,
                                      device=device, dtype="float32", max_num_seqs=4,
                                      max_model_len=64, num_kv_blocks=9,
                                      enable_prefix_caching=False))

    sp = SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True)
    batches = [[list(range(5 + r, 45 + r)), [7, 8, 9 + r], [10, 11 + r], [12, 13, 14, 15 + r]]
               for r in range(4)]
    fresh = engine()
    want = [[o.outputs[0].token_ids for o in fresh.generate(b, sp, use_tqdm=False)]
            for b in batches]
    eng = engine()
    loud = LoRARequest("loud", 2, str(adapter))
    outs = eng.generate([list(range(20, 32))] * 4, sp, [loud] * 4, use_tqdm=False)
    assert {o.outputs[0].finish_reason for o in outs} == {"error"}
    got = [[(o.outputs[0].finish_reason, o.outputs[0].token_ids)
            for o in eng.generate(b, sp, use_tqdm=False)] for b in batches]
    assert got == [[("length", ids) for ids in w] for w in want]


@pytest.mark.parametrize("sampling", [{"temperature": 1e-40}, {"temperature": 5e-324},
                                      {"temperature": 1e-45, "top_k": 3, "seed": 1},
                                      {"temperature": 1.0, "repetition_penalty": 1e-40},
                                      {"temperature": 1.0, "top_p": 1e-320},
                                      {"temperature": 0.7, "top_p": 1e-46, "seed": 2},
                                      {"temperature": 1.0, "top_p": 1e-46, "top_k": 5}])
def test_extreme_but_valid_sampling_values_sample(tiny_llama, sampling):
    """A temperature far below float32's range overflowed logits / temperature to inf (0 / 0
    where it rounds to 0), a tiny repetition_penalty divided seen tokens' logits into inf,
    a top_p that is 0 in float32 (1e-46: a hostile-tenant audit) dropped every token, the
    first too: softmax gave NaN and ``multinomial`` raised out of ``step``, which ended the
    worker and counted an attempt of every job beside it. They sample now; a tiny
    temperature or top_p is greedy."""
    from lorry.engine import EngineConfig, LLMEngine, SamplingParams

    eng = LLMEngine(EngineConfig(model=str(tiny_llama.dir), device="cpu", dtype="float32"))
    [out] = eng.generate([[5, 6, 5, 6]], SamplingParams(max_tokens=6, ignore_eos=True,
                                                        **sampling), use_tqdm=False)
    assert len(out.outputs[0].token_ids) == 6 and out.outputs[0].finish_reason == "length"
    if "repetition_penalty" not in sampling:
        [greedy] = eng.generate([[5, 6, 5, 6]], SamplingParams(max_tokens=6, ignore_eos=True,
                                                               temperature=0), use_tqdm=False)
        assert out.outputs[0].token_ids == greedy.outputs[0].token_ids


def test_a_rank_of_zero_is_refused(adapter, tiny_llama):
    _edit_config(adapter, rank_pattern={"q_proj": 0})
    with pytest.raises(AdapterFormatError, match="rank 0 .*ranks must be positive"):
        _parse(adapter, tiny_llama)


def test_a_weights_file_changed_after_its_header_was_checked_is_refused(adapter, tiny_llama,
                                                                         tmp_path):
    """The tensors read must have the shapes the header was checked with: a file swapped for
    one of another rank between the check and the read is refused, never broadcast."""
    import dataclasses

    import torch

    from lorry.engine import EngineConfig, LLMEngine
    from lorry.engine.lora.weights import load_adapter_weights
    from lorry.testing import make_peft_adapter

    other = make_peft_adapter(tiny_llama.dir, tmp_path / "r1", base_model=tiny_llama.hf, r=1,
                              lora_alpha=2, target_modules="all-linear", seed=3)
    spec = _parse(adapter, tiny_llama)
    swapped = dataclasses.replace(spec, weights_file=other / "adapter_model.safetensors")
    eng = LLMEngine(EngineConfig(model=str(tiny_llama.dir), max_loras=2, max_lora_rank=8,
                                 device="cpu", dtype="float32"))
    with pytest.raises(AdapterFormatError, match=r"has shape \[1, .*header said \[4, "):
        load_adapter_weights(swapped, read_base_config(tiny_llama.dir), 8, torch.float32,
                             False, layout=eng.loras.gpu.layout)
