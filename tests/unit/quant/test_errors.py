"""Refusals: bad quantization values, missing packages, wrong device, wrong checkpoint."""
from __future__ import annotations

import json
import sys

import pytest

from lorry.engine import EngineConfig


def _engine(model, **kw):
    from lorry.engine import LLMEngine
    return LLMEngine(EngineConfig(model=str(model), dtype="float32", device="cpu", **kw))


def test_bad_value_lists_the_allowed_methods():
    with pytest.raises(ValueError, match=r"quantization='int3'.*allowed.*'bnb-nf4'.*'gptq'"):
        EngineConfig(model="m", quantization="int3")


@pytest.mark.parametrize("method,package", [("bnb-nf4", "bitsandbytes"),
                                            ("torchao-int8", "torchao")])
def test_missing_package_is_named_with_the_install_hint(tiny, monkeypatch, method, package):
    monkeypatch.setitem(sys.modules, package, None)      # import of it now fails
    with pytest.raises(ImportError, match=rf"'{package}'.*pip install 'lorry\[quant\]'"):
        _engine(tiny[1], quantization=method)


def test_torchao_int4_refused_on_cpu(tiny):
    with pytest.raises(ValueError, match="torchao-int4.*CUDA.*on CPU use"):
        _engine(tiny[1], quantization="torchao-int4")


def test_gptq_needs_a_gptq_checkpoint(tiny):
    with pytest.raises(ValueError, match="needs a pre-quantized GPTQ checkpoint"):
        _engine(tiny[1], quantization="gptq")


def test_other_method_on_a_gptq_checkpoint_is_refused(tiny):
    from lorry.engine.quant.rtn import export_rtn_checkpoint
    root, base, _ = tiny
    ckpt = export_rtn_checkpoint(base, root / "gptq_err", "gptq", group_size=32)
    with pytest.raises(ValueError, match="already quantized with 'gptq'"):
        _engine(ckpt, quantization="bnb-nf4")


def test_unsupported_prequantized_checkpoint_is_refused(tiny, tmp_path):
    import shutil
    shutil.copytree(tiny[1], tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "fp8"}
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="quant_method='fp8'.*allowed pre-quantized"):
        _engine(tmp_path / "m")
