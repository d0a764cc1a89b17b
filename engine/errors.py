"""Errors the engine raises for adapters it refuses (all subclasses of ValueError)."""
from __future__ import annotations


class LoRAError(ValueError):
    """An adapter cannot be used; the message says what is wrong and what is allowed."""


class AdapterNotFoundError(LoRAError):
    """The adapter directory, Hub repo or one of its files does not exist."""


class AdapterSourceError(LoRAError):
    """The adapter's source is not allowed: a path outside the allowed roots, or neither an
    absolute path nor a Hub repo id."""


class AdapterFormatError(LoRAError):
    """adapter_config.json or the weights file is unreadable, corrupt or inconsistent."""


class UnsupportedAdapterError(LoRAError):
    """A PEFT feature the engine does not serve (DoRA, bias, modules_to_save, embeddings...)."""


class RankTooLargeError(LoRAError):
    """The adapter's rank exceeds the engine's max_lora_rank."""


class BaseModelMismatchError(LoRAError):
    """Target modules or tensor shapes do not fit the loaded base model."""


class ModelLengthError(ValueError):
    """A prompt (plus max_tokens) does not fit max_model_len."""
