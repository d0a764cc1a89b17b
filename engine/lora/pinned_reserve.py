"""One pinned host segment, reserved at the first pinned allocation, for the CPU cache's
adapter staging buffers (CUDA).

A cold adapter load stages its weights in pinned host memory. Without a reserve, each staging
buffer is its own ``cudaHostAlloc`` (7-50 ms for 14-110 MB on an H200), which holds a driver
lock: the engine thread's kernel launches stall beside it (benchmarks/pinned_alloc.py: 25,511
launches/s beside allocations against 142,413 alone, 100,127 with a reserved segment).
torch's host allocator can reserve one segment at its first allocation and carve every later
block (rounded up to a power of two) out of it without a CUDA call; blocks that do not fit
fall back to ``cudaHostAlloc`` as before. On the bulk workload's cold run (1,000 requests,
H200) the reserve took the 5.8-7.6 s of allocation time out of the timed part and ran as fast
as the adapters preloaded (docs/BENCHMARKS.md).

The setting is torch's ``pinned_reserve_segment_size_mb`` (PYTORCH_CUDA_ALLOC_CONF), set at
run time before any pinned allocation, beside the allocator settings in effect (torch parses
the whole string again and resets what it leaves out); the segment is made once per process,
so the first engine's size holds for the process. An operator's own PYTORCH_ALLOC_CONF (or
PYTORCH_CUDA_ALLOC_CONF) that names the key wins.
"""
from __future__ import annotations

import os

import torch

KEY = "pinned_reserve_segment_size_mb"
ENV_KEYS = ("PYTORCH_ALLOC_CONF", "PYTORCH_CUDA_ALLOC_CONF")   # torch reads the first one set
SMALLEST_MB = 1         # torch refuses a reserve of 0: this size stands in for "none" after
HOST_SHARE = 4          # the automatic size takes at most a quarter of host memory per GPU
MIB = 1 << 20

_process: dict = {}     # what the first engine of this process decided (the segment is one)


def staging_bytes(layout, rank: int, dtype: torch.dtype) -> int:
    """Bytes of one adapter's staging buffer at ``rank`` touching every family of the layout
    (the most an adapter of at most that rank stages, modules_to_save apart)."""
    rows = layout.block_rows(rank)
    return sum(sum(layout.numel(f, rows)) for f in layout.families) * dtype.itemsize


def power_of_two(n: int) -> int:
    """The size torch's host allocator gives a request of ``n`` bytes."""
    return 1 << max(n - 1, 0).bit_length()


def host_gpus() -> int:
    """NVIDIA GPUs in this host (``/proc/driver/nvidia/gpus``, whatever CUDA_VISIBLE_DEVICES
    hides: one worker per GPU is the usual layout), at least 1."""
    try:
        return max(1, len(os.listdir("/proc/driver/nvidia/gpus")))
    except OSError:
        return max(1, torch.cuda.device_count() if torch.cuda.is_available() else 1)


def host_memory_bytes() -> int | None:
    """This process's share of host memory for the automatic size: the host's memory over
    its GPUs (a worker per GPU each reserving its quarter would pin it all)."""
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):   # no sysconf names on this platform
        return None
    return total // host_gpus()


def auto_mb(adapters: int, one_bytes: int, host_bytes: int | None) -> int:
    """Room for ``adapters`` staging buffers of ``one_bytes`` each (as the allocator rounds
    them), at most a ``1/HOST_SHARE`` of host memory, in whole MiB."""
    want = adapters * power_of_two(one_bytes)
    if host_bytes:
        want = min(want, host_bytes // HOST_SHARE)
    return -(-want // MIB)


def _torch_settings() -> str | None:
    """The allocator settings torch holds now (from the environment variable it read, or
    set at run time since); None where this torch cannot tell."""
    get = getattr(torch._C, "_accelerator_getAllocatorSettings", None)
    return None if get is None else get()


def _env_setting() -> tuple[str, int | None]:
    """(the allocator settings in effect, their reserve in MiB or None)."""
    env = _torch_settings()
    if env is None:
        env = next((os.environ[k] for k in ENV_KEYS if os.environ.get(k)), "")
    for item in env.split(","):
        key, _, value = item.partition(":")
        if key.strip() == KEY:
            try:
                return env, int(value)
            except ValueError:
                return env, None
    return env, None


def _setter():
    return getattr(torch._C, "_accelerator_setAllocatorSettings", None) \
        or torch.cuda.memory._set_allocator_settings


def _pin_first() -> None:
    """The process's first pinned allocation, which makes the segment (now, at start, rather
    than inside the first adapter load)."""
    torch.empty(1, dtype=torch.uint8, pin_memory=True)


def reserve(option: int | None, *, adapters: int, one_bytes: int) -> dict:
    """Set the process's reserve before its first pinned allocation and make it. ``option``:
    MiB, 0 off, None automatic (``auto_mb``). Returns {"mb", "how"} for the engine's stats;
    how: "set", "environment" (the operator's setting), "off", "first engine" (a reserve was
    decided in this process already) or "not set: <why>" (torch refused the setting, or the
    host could not pin that much: loads then pin each buffer on its own, as without)."""
    if _process:
        return {**_process, "how": f"first engine ({_process['how']})"}
    env, theirs = _env_setting()
    if KEY in env:
        status = {"mb": theirs, "how": "environment"}
    elif option == 0:
        status = {"mb": 0, "how": "off"}
    else:
        mb = option if option is not None else auto_mb(adapters, one_bytes,
                                                         host_memory_bytes())
        status = {"mb": mb, "how": "set"}
        try:   # the operator's other settings again, unchanged, with the reserve
            _setter()(",".join(s for s in (env, f"{KEY}:{mb}") if s))
        except (RuntimeError, ValueError, TypeError) as e:
            status = {"mb": 0, "how": f"not set: {e}"}
        else:
            try:
                _pin_first()
            except RuntimeError as e:   # not that much to pin: the segment (a static that
                # is tried again at each allocation until it is made) must not stay asked
                # for; torch refuses 0, so the smallest one is made instead
                status = {"mb": 0, "how": f"not set: pinning {mb} MiB failed ({e})"}
                try:
                    _setter()(",".join(s for s in (env, f"{KEY}:{SMALLEST_MB}") if s))
                    _pin_first()
                except (RuntimeError, ValueError, TypeError) as again:
                    status["how"] += f"; {SMALLEST_MB} MiB failed too ({again})"
    _process.update(status)
    return dict(status)
