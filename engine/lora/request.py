"""LoRARequest: which adapter a request uses (torch-free, as in vLLM)."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class LoRARequest:
    """An adapter to apply to a request.

    Parameters
    ----------
    lora_name : str
        Human-readable name (shown in outputs and stats).
    lora_int_id : int
        Stable positive id; the caches key adapters by it.
    lora_path : str
        Local PEFT directory or Hugging Face Hub repo id.
    revision : str, optional
        Hub revision (branch, tag or commit) when ``lora_path`` is a repo id.
    roots : tuple of str, optional
        Directories a local ``lora_path`` must resolve inside when its files are read, on top
        of the engine's ``adapter_roots`` (a service's per-tenant roots): checked at every
        load, so a directory swapped for a link elsewhere after an earlier check is refused.
    """

    lora_name: str
    lora_int_id: int
    lora_path: str
    revision: str | None = None
    roots: tuple[str, ...] | None = None

    def __post_init__(self):
        if isinstance(self.lora_int_id, bool) or not isinstance(self.lora_int_id, int) \
                or self.lora_int_id < 1:
            raise ValueError(f"lora_int_id must be a positive int, got {self.lora_int_id!r}")
        if not self.lora_name or not isinstance(self.lora_name, str):
            raise ValueError(f"lora_name must be a non-empty string, got {self.lora_name!r}")
        if not self.lora_path or not isinstance(self.lora_path, str):
            raise ValueError(f"lora_path must be a non-empty string, got {self.lora_path!r}")
        if self.roots is not None and not (
                isinstance(self.roots, tuple) and self.roots
                and all(isinstance(r, str) and r.startswith("/") for r in self.roots)):
            raise ValueError(f"roots must be a non-empty tuple of absolute paths, got "
                             f"{self.roots!r}")
