"""Where an adapter may come from: a local directory inside the allowed roots, or a Hub id.

The form of a source decides which it is: an absolute path is local, ``owner/name`` is a
Hugging Face Hub repo id (never looked up on local disk), anything else is refused. A local
path, and each adapter file in it, must resolve (symlinks followed) inside an allowed root.
Torch-free: the API and the CLI at registration and the engine at load time apply these rules.
"""
from __future__ import annotations

import contextlib
import os
import re
import shutil
import stat
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from lorry.engine.errors import AdapterSourceError

LOCAL, HUB = "local", "hub"
ADAPTER_FILES = ["adapter_config.json", "adapter_model.safetensors", "adapter_model.bin"]
# Hub repo ids as huggingface_hub validates them: 'owner/name', each part 1-96 of
# [A-Za-z0-9_.-], not starting or ending with '.' or '-', no '--' or '..'.
_HUB_PART = r"[A-Za-z0-9_](?:[A-Za-z0-9_.-]{0,94}[A-Za-z0-9_])?"
HUB_ID = re.compile(rf"^{_HUB_PART}/{_HUB_PART}$")
# Hub revisions: a branch, tag or commit ('main', 'v1.0', 'refs/pr/3', a sha).
REVISION = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.+/-]{0,199}$")
TENANT_DIR = re.compile(r"^[A-Za-z0-9_-]{1,128}$")
MAX_SOURCE_CHARS = 1024


@dataclass(frozen=True)
class AdapterSource:
    """A checked source: ``kind`` is LOCAL or HUB; ``location`` the real path or the repo id."""

    kind: str
    location: str
    revision: str | None = None


def source_kind(source: str) -> str:
    """LOCAL for an absolute path (``~`` expanded), HUB for ``owner/name``; else refused."""
    if not isinstance(source, str) or not source or len(source) > MAX_SOURCE_CHARS \
            or any(ord(c) < 32 for c in source):
        raise AdapterSourceError(f"adapter source {str(source)[:80]!r} is invalid: give an "
                                 f"absolute path or a Hub repo id 'owner/name' of at most "
                                 f"{MAX_SOURCE_CHARS} printable characters")
    if source.startswith(("/", "~")):
        if not os.path.isabs(os.path.expanduser(source)):  # '~nosuchuser/x' stays relative
            raise AdapterSourceError(f"adapter source {source!r} does not expand to an absolute "
                                     "path; give the directory as an absolute path")
        return LOCAL
    if HUB_ID.match(source) and "--" not in source and ".." not in source:
        return HUB
    raise AdapterSourceError(
        f"adapter source {source!r} is neither an absolute local path nor a Hub repo id of the "
        "form 'owner/name'; give a local directory as an absolute path (relative paths are "
        "never resolved)")


def check_revision(revision: str | None) -> None:
    """Refuse a Hub revision that is not a plain branch, tag or commit name."""
    if revision is not None and (not isinstance(revision, str) or not REVISION.match(revision)
                                 or ".." in revision or "//" in revision):
        raise AdapterSourceError(f"revision {str(revision)[:80]!r} is invalid: give a branch, "
                                 "tag or commit ([A-Za-z0-9_.+/-], no '..')")


def confine(path: str, roots: Sequence[str] | None, reveal: bool = True) -> str:
    """The real path of ``path`` (symlinks resolved) if it lies inside one of ``roots``.

    ``roots=None`` means no confinement (library use). Raises AdapterSourceError naming the
    path, where it resolves (unless ``reveal`` is False: a tenant is not told where a path
    outside its roots leads, such as /proc/self/cwd or another tenant's directory) and the
    allowed roots.
    """
    real = os.path.realpath(os.path.expanduser(path))
    if roots is None:
        return real
    for root in roots:
        root_real = os.path.realpath(os.path.expanduser(root))
        if os.path.commonpath([real, root_real]) == root_real:
            return real
    where = f" (resolved to {real!r})" if reveal else ""
    raise AdapterSourceError(
        f"adapter path {path!r}{where} is outside the allowed adapter roots "
        f"{list(roots)}; copy it under one of them or ask the operator to add a root "
        "(LORRY_ADAPTER_ROOTS)")


@contextlib.contextmanager
def pinned_files(directory: str, roots: Sequence[Sequence[str] | None],
                 reveal: bool = False, under: str | None = None) -> Iterator[str]:
    """A directory to read ``directory``'s adapter files from, each file opened now and
    checked, as opened, inside every one of ``roots`` (a list of root lists; None entries
    confine nothing). Its entries lead to the open files (Linux: ``/proc/self/fd/N``), so a
    file swapped for a link out of the roots between ``check_source`` and the read is not
    what is read: the checked file is. Where /proc is missing, or nothing confines, it is
    ``directory`` itself (the check stays the one of ``check_source``). ``under``: where the
    private folder goes (the loader process's own directory, removed should it be killed)."""
    limits = [r for r in roots if r is not None]
    if not limits or not os.path.isdir("/proc/self/fd"):
        yield directory
        return
    fds: list[int] = []
    holder = tempfile.mkdtemp(prefix="lorry-adapter-", dir=under)
    try:
        weights = next((n for n in ADAPTER_FILES[1:]  # the one parse_adapter reads
                        if os.path.isfile(os.path.join(directory, n))), None)
        for name in ("adapter_config.json", weights):
            if name is None:
                continue
            try:  # O_NONBLOCK: a FIFO does not block the open (left out just below)
                fd = os.open(os.path.join(directory, name), os.O_RDONLY | os.O_NONBLOCK)
            except FileNotFoundError:
                continue
            except OSError as e:
                raise AdapterSourceError(f"adapter {directory!r}: cannot open {name} "
                                         f"({e.strerror or e})") from None
            fds.append(fd)
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                continue  # a directory or FIFO of that name: as if missing (parse says so)
            opened = os.readlink(f"/proc/self/fd/{fd}")
            for allowed in limits:
                try:
                    confine(opened, allowed, reveal)
                except AdapterSourceError:
                    raise AdapterSourceError(
                        f"adapter {directory!r}: {name} is outside the allowed adapter roots "
                        f"{list(allowed)} as it is read (a link changed since it was "
                        "checked?)") from None
            os.symlink(f"/proc/self/fd/{fd}", os.path.join(holder, name))
        yield holder
    finally:
        for fd in fds:
            os.close(fd)
        shutil.rmtree(holder, ignore_errors=True)


def tenant_roots(roots: Sequence[str], tenant_id: str) -> list[str]:
    """``{root}/{tenant_id}`` for each root: a tenant's own directories when roots are per
    tenant (the tenant id, ``tenant_<hex>``, is fixed and safe as a path component)."""
    if not isinstance(tenant_id, str) or not TENANT_DIR.match(tenant_id):
        raise AdapterSourceError(f"tenant id {tenant_id!r} cannot name a directory")
    return [os.path.join(root, tenant_id) for root in roots]


def check_source(source: str, *, revision: str | None = None,
                 roots: Sequence[str] | None = None, allow_hub: bool = True,
                 reveal: bool = True) -> AdapterSource:
    """Decide local vs Hub by the form of ``source`` and check it against the rules.

    A local source comes back as its real path; it and the adapter files in it must lie inside
    ``roots`` (None: anywhere). A Hub id is checked by form only (``revision`` too).
    ``reveal``: a refusal names where a path outside the roots resolves (not to tenants).
    """
    if source_kind(source) == HUB:
        if not allow_hub:
            raise AdapterSourceError(f"Hub adapters are disabled here ({source!r}); register a "
                                     "local path under an allowed root")
        check_revision(revision)
        return AdapterSource(HUB, source, revision)
    real = confine(source, roots, reveal)
    if roots is not None:  # a file symlinked out of the root is outside it too
        for name in ADAPTER_FILES:
            file = os.path.join(real, name)
            if os.path.lexists(file):
                confine(file, roots, reveal)
    return AdapterSource(LOCAL, real, revision)
