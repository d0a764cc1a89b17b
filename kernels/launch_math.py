"""Host-side integer helpers for launch grids and block sizes.

``triton.cdiv`` and ``triton.next_power_of_2`` are constexpr functions: called from Python
each goes through Triton's constexpr unwrapping, microseconds a call (Triton 3.6-3.9). The
launchers call them a dozen times per LoRA layer and per attention call, on every layer of
an eager prefill step, so they use these plain ones instead.
"""
from __future__ import annotations


def cdiv(x: int, y: int) -> int:
    """ceil(x / y) for positive y."""
    return -(-x // y)


def next_pow2(n: int) -> int:
    """The smallest power of two >= n for n >= 1 (0 for 0, as triton.next_power_of_2)."""
    return 1 << (n - 1).bit_length() if n > 0 else 0
