"""Trust primitives every writer and reader of an artefact shares: keys, atomic writes, locks.

- **Keys.** A cached result (plan cell, imported run, study cell, feature cache) lives under a key
  computed from everything it depends on: ``fingerprint(key_dict)``. ``keyed_dir`` makes the
  directory name from a readable label plus the fingerprint and stores the full key beside the
  result (``key.json``); ``check_key`` refuses a directory whose stored key differs and prints
  exactly what differs. A name alone is never a key.
- **Atomic writes.** ``atomic_write_*`` write to a temp name unique to the writer (pid + random),
  fsync, then rename: a reader sees the old file or the new one, never half of either, and two
  writers never share a temp file.
- **Locks.** ``WriterLock`` is an exclusive lock file (``O_CREAT | O_EXCL``) that names its holder
  (pid, host, process start time, command). A second writer waits for it or is refused with who
  holds it; a lock whose holder died on this host is detected as stale and taken over.
- **UserError.** The base of every error a user can cause and fix; the CLI prints it as one line.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
import socket
import sys
import time
from pathlib import Path


class UserError(Exception):
    """An error the user caused and can fix; its message names the thing and the fix."""


class NonFiniteError(UserError, FloatingPointError):
    """A loss, cost or fitness became NaN/inf; the message says where and what to change."""


class LockHeld(UserError):
    """Another live process is writing the artefact."""


class KeyMismatch(UserError):
    """A cached result exists under this name but was made from other inputs."""


# ------------------------------------------------------------------------------------ keys
def canonical_json(obj) -> str:
    """JSON with sorted keys and no whitespace, so equal content always hashes equally."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def fingerprint(obj, length: int = 16) -> str:
    """A short sha256 of ``obj``'s canonical JSON (16 hex chars = 64 bits: no accidental clash)."""
    return hashlib.sha256(canonical_json(obj).encode()).hexdigest()[:length]


_SHA_CACHE: dict[tuple[str, int, int], str] = {}


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """Full sha256 of a file. Cached in-process by (path, size, mtime) so repeated keys are cheap."""
    path = Path(path)
    stat = path.stat()
    cache_key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if cache_key in _SHA_CACHE:
        return _SHA_CACHE[cache_key]
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    _SHA_CACHE[cache_key] = h.hexdigest()
    return _SHA_CACHE[cache_key]


def crc32c(data: bytes) -> int:
    """CRC32C (Castagnoli) of ``data``, the checksum Zarr's ``crc32c`` codec uses."""
    import google_crc32c

    return int(google_crc32c.value(data))


def _flatten(obj, prefix: str = "") -> dict[str, object]:
    if isinstance(obj, dict):
        out: dict[str, object] = {}
        for k, v in obj.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1] if prefix else "(value)": obj}


def key_differences(old: dict, new: dict) -> list[str]:
    """Human-readable ``"a.b: old -> new"`` lines for every leaf that differs between two keys."""
    a, b = _flatten(json.loads(canonical_json(old))), _flatten(json.loads(canonical_json(new)))
    lines = []
    for name in sorted(set(a) | set(b)):
        if a.get(name, "<absent>") != b.get(name, "<absent>"):
            lines.append(f"{name}: {a.get(name, '<absent>')!r} -> {b.get(name, '<absent>')!r}")
    return lines


def check_key(directory: Path, key: dict, what: str) -> None:
    """Refuse ``directory`` if its ``key.json`` exists and differs from ``key`` (lists the differences)."""
    path = Path(directory) / "key.json"
    if not path.is_file():
        return
    try:
        stored = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise KeyMismatch(
            f"{what} at {directory}: key.json is unreadable ({err}); delete {directory} to recompute"
        ) from err
    if canonical_json(stored) != canonical_json(key):
        diff = "\n  ".join(key_differences(stored, key)) or "(no leaf differs; key format changed)"
        raise KeyMismatch(
            f"{what} at {directory} was made from other inputs:\n  {diff}\n"
            f"Use another output directory, or delete {directory} to recompute."
        )


def keyed_dir(base: str | Path, label: str, key: dict) -> Path:
    """``base/<label>__<fingerprint(key)>``: a readable name plus the key's hash (not created)."""
    return Path(base) / f"{label}__{fingerprint(key, 12)}"


def write_key(directory: Path, key: dict) -> None:
    """Store ``key`` as ``directory/key.json`` (after ``check_key``, so it never overwrites another)."""
    Path(directory).mkdir(parents=True, exist_ok=True)
    atomic_write_text(Path(directory) / "key.json", json.dumps(key, indent=1, sort_keys=True, default=str))


# ------------------------------------------------------------------------------ fault injection
_FAULT_COUNTS: dict[str, int] = {}


def fault_point(label: str) -> None:
    """A named write boundary, where the fault-injection tests and campaign can strike.

    ``WMLAB_FAULT_LOG=<file>`` appends every label reached (to enumerate the boundaries of a run).
    ``WMLAB_FAULT=<substring>:<n>`` SIGKILLs this process at the n-th (1-based) boundary whose label
    contains the substring; ``WMLAB_FAULT=enospc:<substring>:<n>`` raises "No space left on device"
    there instead. Unset (always, outside tests), it costs one environment lookup.
    """
    log, spec = os.environ.get("WMLAB_FAULT_LOG"), os.environ.get("WMLAB_FAULT")
    if log:
        with open(log, "a") as f:
            f.write(f"{os.getpid()} {label}\n")
    if not spec:
        return
    mode, _, rest = spec.partition(":") if spec.startswith("enospc:") else ("kill", "", spec)
    needle, _, nth = rest.rpartition(":")
    if not nth.isdigit():  # labels hold ':' themselves ("store.create:arrays"): no count given
        needle, nth = rest, "1"
    if needle not in label:
        return
    _FAULT_COUNTS[needle] = _FAULT_COUNTS.get(needle, 0) + 1
    if _FAULT_COUNTS[needle] != int(nth or 1):
        return
    if mode == "enospc":
        import errno

        raise OSError(errno.ENOSPC, "No space left on device (injected)", label)
    import signal

    os.kill(os.getpid(), signal.SIGKILL)


# ------------------------------------------------------------------------------ atomic writes
def unique_tmp(path: str | Path) -> Path:
    """A temp path beside ``path``, unique to this writer: ``.<name>.<pid>.<random>.partial``."""
    path = Path(path)
    return path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.partial")


def fsync_dir(directory: str | Path) -> None:
    """Make a rename inside ``directory`` durable (no-op where directories cannot be opened)."""
    try:
        fd = os.open(str(directory), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | Path, data: bytes, fsync: bool = True) -> None:
    """Write ``data`` to ``path`` atomically; on any failure (disk full...) the old file is intact."""

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            f.write(data)
            if fsync:
                f.flush()
                os.fsync(f.fileno())

    _write_aside_and_rename(Path(path), write, fsync_tmp=False, fsync=fsync)


def atomic_write_text(path: str | Path, text: str, fsync: bool = True) -> None:
    atomic_write_bytes(path, text.encode(), fsync=fsync)


def atomic_write_json(path: str | Path, data, fsync: bool = True) -> None:
    atomic_write_text(path, json.dumps(data, indent=1, default=str), fsync=fsync)


def atomic_write_with(path: str | Path, write, fsync: bool = True) -> None:
    """Call ``write(tmp_path)`` (a library that writes files itself), then rename onto ``path``."""
    _write_aside_and_rename(Path(path), write, fsync_tmp=fsync, fsync=fsync)


def _write_aside_and_rename(path: Path, write, fsync_tmp: bool, fsync: bool) -> None:
    """``write(tmp)`` to a temp name unique to this writer, (fsync it), rename it onto ``path``, fsync the
    directory. On any failure the temp file is removed and ``path`` is untouched."""
    tmp = unique_tmp(path)
    try:
        write(tmp)
        if fsync_tmp:
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        fault_point(f"before-rename:{path.name}")
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    if fsync:
        fsync_dir(path.parent)
    fault_point(f"after-rename:{path.name}")


def _partial_writer_pid(name: str) -> int | None:
    """The writer pid in a ``unique_tmp`` name (``.<name>.<pid>.<8 hex>.partial``), else None.

    Only our own pattern counts: Zarr's temp files (``<chunk>.<uuid hex>.partial``) carry no pid, and
    reading a digit-only chunk name such as ``0`` as pid 0 would make them look forever alive.
    """
    parts = name.split(".")
    if len(parts) < 5 or parts[0] != "" or parts[-1] != "partial":
        return None
    pid, token = parts[-3], parts[-2]
    if not (pid.isdigit() and int(pid) > 0 and len(token) == 8):
        return None
    try:
        int(token, 16)
    except ValueError:
        return None
    return int(pid)


def clean_partials(directory: str | Path, recursive: bool = False) -> int:
    """Delete leftover ``.partial`` temp files of writers that are no longer alive. Returns how many.

    A temp name carries its writer's pid (``unique_tmp``); one whose pid is alive is left alone
    (another writer may be mid-write). Names without a pid (older layouts) are removed.
    """
    directory = Path(directory)
    if not directory.is_dir():
        return 0
    removed = 0
    for path in directory.rglob("*.partial") if recursive else directory.glob("*.partial"):
        pid = _partial_writer_pid(path.name)
        if pid is not None and _pid_alive(pid, None):
            continue
        with contextlib.suppress(OSError):
            path.unlink() if path.is_file() else None
            removed += 1
    return removed


# ------------------------------------------------------------------------------------ locks
def _process_start(pid: int) -> str | None:
    """The kernel's start time of ``pid`` (clock ticks since boot), to tell a reused pid apart."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def _pid_alive(pid: int, start: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    now = _process_start(pid)
    return start is None or now is None or now == start


_HELD: dict[str, int] = {}  # lock path -> nesting depth held by this process


class WriterLock:
    """An exclusive, named lock on one artefact being written (dataset, cache, run, study file).

    The lock file is ``.<name>.lock`` beside ``target`` (a file or a directory, which need not
    exist yet: a dataset built aside and renamed into place is locked before it exists).
    ``wait`` seconds: 0 refuses at once with who holds it; > 0 polls until then.
    Re-entrant within one process, so a study holding its directory may call stages that lock it.
    Use as a context manager.
    """

    def __init__(self, target: str | Path, what: str, wait: float = 0.0, poll: float = 0.2) -> None:
        target = Path(target).absolute()
        self.what, self.wait, self.poll = what, float(wait), poll
        self.target = target
        self.path = target.with_name(f".{target.name}.lock")
        self._key = str(self.path.resolve())

    def holder(self) -> dict | None:
        try:
            return json.loads(self.path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, json.JSONDecodeError):
            return {}  # being written this instant, or garbage: treated as held, then as stale below

    def _try_take(self) -> bool:
        info = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "start": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "process_start": _process_start(os.getpid()),
            "command": " ".join(sys.argv)[:500],
        }
        try:
            fd = os.open(str(self.path), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(info))
        return True

    def _stale(self, holder: dict) -> bool:
        if not holder:
            # Unreadable lock file: stale only if it has been so for a while (not mid-write).
            with contextlib.suppress(OSError):
                return time.time() - self.path.stat().st_mtime > 5.0
            return False
        if holder.get("host") != socket.gethostname():
            return False  # another machine's process: we cannot tell, so never steal it
        return not _pid_alive(int(holder.get("pid", -1)), holder.get("process_start"))

    def acquire(self) -> WriterLock:
        if _HELD.get(self._key):
            _HELD[self._key] += 1
            return self
        self.path.parent.mkdir(parents=True, exist_ok=True)
        deadline = time.monotonic() + self.wait
        while True:
            if self._try_take():
                _HELD[self._key] = 1
                return self
            holder = self.holder()
            if holder is None:
                continue  # released between our attempt and the read
            if self._stale(holder):
                # Rename first so two processes breaking the same stale lock cannot both win.
                grave = self.path.with_name(f"{self.path.name}.stale.{os.getpid()}.{secrets.token_hex(3)}")
                with contextlib.suppress(OSError):
                    os.rename(self.path, grave)
                    grave.unlink()
                continue
            if time.monotonic() >= deadline:
                who = (
                    f"pid {holder.get('pid')} on {holder.get('host')} since {holder.get('start')}"
                    f" ({holder.get('command', '')[:120]})"
                    if holder
                    else "another process"
                )
                raise LockHeld(
                    f"{self.what} {self.target} is being written by {who}. Wait for it to finish; "
                    f"if that process is gone, delete {self.path}."
                )
            time.sleep(self.poll)

    def release(self) -> None:
        depth = _HELD.get(self._key, 0)
        if depth > 1:
            _HELD[self._key] = depth - 1
            return
        _HELD.pop(self._key, None)
        holder = self.holder()
        if holder and holder.get("pid") == os.getpid():
            with contextlib.suppress(OSError):
                self.path.unlink()

    def __enter__(self) -> WriterLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
