"""Writing the pack's files: atomically, with ordinary permissions, checked before long jobs, one writer at a time.

Every file the pack writes (bundles, checkpoints, LoRAs, embeddings, PNGs, JSON) goes through
`atomic_write`: the bytes go to a hidden temp file beside the target (`.<name>.<random>.tmp`),
which is renamed over the target only when complete. The temp file gets the mode a plain
`open()` would give (0666 minus the umask for a new file, the old file's mode for one it replaces), not
`mkstemp`'s 0600, so another user's ComfyUI can read what we wrote. A failed write names the path and the
cause (no space, no permission).
Temp files of ours that a killed process left behind are removed at the next write into that
folder, once they are older than this process.
"""

from __future__ import annotations

import contextlib
import contextvars
import errno
import json
import os
import re
import socket
import stat
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable, Iterator

from .errors import ConfigError, OutputBusyError, OutputWriteError

# Our own temp names only: "." + target name + "." + mkstemp's 8 random characters + ".tmp".
_TEMP_PATTERN = re.compile(r"^\..+\.[A-Za-z0-9_]{8}\.tmp$")
_PROCESS_START = time.time()
_NO_SPACE = {errno.ENOSPC, errno.EDQUOT}
_NO_PERMISSION = {errno.EACCES, errno.EPERM, errno.EROFS}


def describe_os_error(exc: OSError, action: str | None = None) -> str:
    """The cause in words a user acts on. `action` ("write", "read"): what was being done, where known; a
    permission error then says which permission is missing."""
    if exc.errno in _NO_SPACE:
        return "no space left on the device"
    if exc.errno in _NO_PERMISSION:
        if exc.errno == errno.EROFS:
            return "the file system is read-only"
        if action:
            return f"no permission to {action} there (read-only folder or file owned by another user)"
        return "permission denied (a file or folder owned by another user, or not readable or writable by you)"
    return exc.strerror or str(exc)


def write_error(path: str | os.PathLike, exc: OSError, advice: str = "") -> OutputWriteError:
    text = f"cannot write {path}: {describe_os_error(exc, 'write')}"
    return OutputWriteError(f"{text}; {advice}" if advice else text)


# --- names -------------------------------------------------------------------------------------

# A name every command and node accepts for a file it writes (bundle, LoRA, embedding): one path
# component that ComfyUI's prompt syntax reads back whole as `embedding:NAME`. ComfyUI
# (comfy/sd1_clip.py, SDTokenizer) first parses "(...)" / "(...:w)" as weights, splits the text
# after "embedding:" at whitespace, strips trailing commas, and escapes with "\\": so spaces,
# parentheses, colons, commas and backslashes break the name, and slashes or ".." leave the folder.
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")
NAME_RULE = "letters, digits, '_', '-' and '.', starting with a letter or digit, at most 100 characters"


def suggest_name(name: str) -> str:
    """A valid name close to `name`."""
    stem = Path(name.replace("\\", "/")).name if name else ""
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", stem.removesuffix(".safetensors"))
    stem = re.sub(r"\.{2,}", ".", stem).strip("._-")[:100].rstrip("._-")
    return stem or "my_concept"


def check_name(name: str, what: str = "name") -> str:
    """`name` (a trailing .safetensors is allowed and dropped) if every command and node accepts it; else ConfigError
    saying why and suggesting a valid one."""
    stem = name.removesuffix(".safetensors") if isinstance(name, str) else name
    if not isinstance(stem, str) or not NAME_PATTERN.match(stem) or ".." in stem or stem.endswith("."):
        raise ConfigError(
            f"{what} {name!r} cannot be used: a name is one file name that ComfyUI's prompts read back as "
            f"'embedding:NAME' ({NAME_RULE}); try {suggest_name(str(name))!r}"
        )
    return stem


def file_mode() -> int:
    """The mode a plain open() gives a new file: 0666 minus the process umask."""
    return 0o666 & ~_umask()


def folder_mode() -> int:
    """The mode a plain mkdir() gives a new folder: 0777 minus the process umask."""
    return 0o777 & ~_umask()


def give_plain_modes(root: str | os.PathLike) -> None:
    """Give a written folder tree the modes open() and mkdir() would have: `tempfile.mkdtemp` makes folders 0700
    and safetensors' writer (diffusers' `save_pretrained`) files 0600, which another user's ComfyUI cannot read."""
    files, folders = file_mode(), folder_mode()
    os.chmod(root, folders)
    for parent, dirnames, filenames in os.walk(root):
        for name in dirnames:
            os.chmod(os.path.join(parent, name), folders)
        for name in filenames:
            os.chmod(os.path.join(parent, name), files)


def _umask() -> int:
    try:  # Linux: read it without changing it (os.umask is process-wide, so not thread-safe to swap)
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    with _UMASK_LOCK:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


_UMASK_LOCK = threading.Lock()


def clean_stale_temp_files(folder: str | os.PathLike) -> list[Path]:
    """Remove our own temp files in `folder` left by a killed write (older than this process); returns them."""
    removed = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for entry in entries:
        if not _TEMP_PATTERN.match(entry.name):
            continue
        try:
            if entry.is_file(follow_symlinks=False) and entry.stat(follow_symlinks=False).st_mtime < _PROCESS_START:
                os.unlink(entry.path)
                removed.append(Path(entry.path))
        except OSError:
            continue
    return removed


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """`write(temp_path)` then rename onto `path`; a crash never leaves half a file at `path`.

    A symbolic link at `path` is written through, as a plain open() writes through it: its target is replaced,
    the link stays. Raises OutputWriteError naming `path` and the cause when the folder or the bytes cannot be
    written.
    """
    path = Path(path)
    if path.is_symlink():
        path = Path(os.path.realpath(path))
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        clean_stale_temp_files(path.parent)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise write_error(path, exc) from exc
    os.close(fd)
    try:
        write(Path(tmp))
        # the mode once the bytes are in: a read-only file being replaced would make the temp file unwritable
        os.chmod(tmp, _replaced_mode(path))
        os.replace(tmp, path)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        raise write_error(path, exc) from exc
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _replaced_mode(path: Path) -> int:
    """The mode the file written to `path` gets: the mode of the file it replaces (as a plain open() of an
    existing file keeps it), else the mode a plain open() gives a new file."""
    try:
        existing = path.stat()
    except OSError:
        return file_mode()
    return stat.S_IMODE(existing.st_mode) if stat.S_ISREG(existing.st_mode) else file_mode()


def _write_bytes(tmp: Path, data: bytes) -> None:
    with open(tmp, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    return atomic_write(path, lambda tmp: _write_bytes(tmp, data))


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


# The folders check_writable created inside the innermost `removing_new_folders_on_error` block.
_NEW_FOLDERS: contextvars.ContextVar[list[Path] | None] = contextvars.ContextVar("echodistill_new_folders",
                                                                                   default=None)
_OUR_LOCKS: set[str] = set()  # lock files this process held (exclusive_output): no other writer's


def _left_by_refusal(entry: Path) -> bool:
    """What a refused job may leave in a folder it made: a lock file it held itself and released."""
    return str(entry.resolve()) in _OUR_LOCKS


@contextlib.contextmanager
def removing_new_folders_on_error() -> Iterator[None]:
    """A job that fails inside this block leaves no folder behind that `check_writable` or `exclusive_output`
    made for it (the command line runs every command in one; see make_folder).

    Folders that existed before, and folders holding anything the job wrote (a checkpoint, an image),
    stay: only an empty folder (or one holding just our released lock file) is removed, deepest first.
    """
    created: list[Path] = []
    token = _NEW_FOLDERS.set(created)
    try:
        yield
    except BaseException:
        for top in reversed(created):
            _remove_if_empty(top)
        raise
    finally:
        _NEW_FOLDERS.reset(token)


def _remove_if_empty(top: Path) -> None:
    for folder in sorted((p for p in [top, *top.rglob("*")] if p.is_dir() and not p.is_symlink()),
                         key=lambda p: len(p.parts), reverse=True):
        try:
            leftovers = [entry for entry in folder.iterdir() if not _left_by_refusal(entry)]
            if not leftovers:
                for entry in folder.iterdir():
                    entry.unlink()
                folder.rmdir()
        except OSError:
            return  # not ours to force: leave it


def _first_missing(folder: Path) -> Path | None:
    """The outermost folder of `folder`'s path that does not exist yet (None when `folder` exists)."""
    missing = None
    for candidate in (folder, *folder.parents):
        if candidate.exists():
            break
        missing = candidate
    return missing


def make_folder(folder: Path) -> None:
    """mkdir -p, remembering (inside `removing_new_folders_on_error`) the outermost folder it made."""
    missing = _first_missing(folder.absolute())
    folder.mkdir(parents=True, exist_ok=True)
    created = _NEW_FOLDERS.get()
    if missing is not None and created is not None:
        created.append(missing)


def check_creatable(folder: str | os.PathLike, what: str = "output folder") -> Path:
    """Without creating anything: refuse a `folder` that could not be made or written, because a file or a broken
    link stands on its path, or its nearest existing folder denies writing. What `--check` commands use.

    Raises OutputWriteError naming the folder, the cause and `what` to choose instead.
    """
    folder = Path(folder)
    blocking = next((p for p in (folder, *folder.parents)
                     if (p.is_symlink() and not p.exists()) or (p.exists() and not p.is_dir())), None)
    if blocking is not None:
        kind = "a broken link" if blocking.is_symlink() and not blocking.exists() else "a file, not a folder"
        raise OutputWriteError(f"cannot write {folder}: {blocking} is {kind}; choose another {what}")
    existing = next(p for p in (folder.absolute(), *folder.absolute().parents) if p.exists())
    if not os.access(existing, os.W_OK | os.X_OK):
        raise OutputWriteError(f"cannot write {folder}: {existing} does not allow writing; choose another {what} "
                               "or fix its permissions")
    return folder


def check_writable(folder: str | os.PathLike, what: str = "output folder") -> Path:
    """Create `folder` if needed and write + remove a probe file in it, before any long job starts; our own stale
    temp files in it go too. Inside `removing_new_folders_on_error`, a folder made here goes again if the job fails.

    Raises OutputWriteError naming the folder and the cause (no permission, no space).
    """
    folder = check_creatable(folder, what)
    try:
        make_folder(folder)
        clean_stale_temp_files(folder)  # what a killed earlier run left behind
        fd, probe = tempfile.mkstemp(prefix=".echodistill-probe.", suffix=".tmp", dir=folder)
        try:
            os.write(fd, b"probe")
        finally:
            os.close(fd)
            os.unlink(probe)
    except OSError as exc:
        raise write_error(folder, exc, f"choose another {what} or fix its permissions / free space") from exc
    return folder


# --- one writer per output -----------------------------------------------------------------------

_HELD: dict[str, list] = {}  # lock path -> [FileLock, count]: re-entrant within this process
_HELD_LOCK = threading.Lock()


def _lock_path(target: Path) -> Path:
    return target / ".echodistill.lock" if target.is_dir() or not target.suffix else \
        target.with_name(f".{target.name}.lock")


@contextlib.contextmanager
def exclusive_output(target: str | os.PathLike, what: str = "output", activity: str = "training") -> Iterator[None]:
    """Hold `target` (a run folder or an output file) for this process; a second process is refused
    (OutputBusyError: "another {activity} is already writing ...; ... choose another {what}").

    The refusal names the holder (process id, host, since when, command) from a note written beside the lock.
    """
    from filelock import FileLock, Timeout

    target = Path(target)
    lock_path = _lock_path(target)
    key = str(lock_path.resolve())
    with _HELD_LOCK:
        held = _HELD.get(key)
        if held is not None:
            held[1] += 1
    if held is None:
        try:
            make_folder(lock_path.parent)
            lock = FileLock(str(lock_path), timeout=0, mode=file_mode())
            lock.acquire()
            _OUR_LOCKS.add(key)
        except Timeout:
            raise OutputBusyError(
                f"another {activity} is already writing {target} ({_holder(lock_path)}): wait for it to finish, "
                f"stop it, or choose another {what}"
            ) from None
        except OSError as exc:
            raise write_error(lock_path.parent, exc) from exc
        _write_holder(lock_path)
        with _HELD_LOCK:
            _HELD[key] = [lock, 1]
    try:
        yield
    finally:
        with _HELD_LOCK:
            entry = _HELD[key]
            entry[1] -= 1
            if entry[1] == 0:
                del _HELD[key]
                _holder_path(lock_path).unlink(missing_ok=True)
                # The job is done: the lock file goes, so a finished run leaves no ".x.lock" beside its output.
                # Unlinked while still held, so a process that opened it before cannot lock it after us; one
                # that opens the path now makes a new file and may start, as this job wrote all it had to.
                with contextlib.suppress(OSError):  # Windows: an open file cannot be removed (filelock does it)
                    lock_path.unlink()
                entry[0].release()


def _holder_path(lock_path: Path) -> Path:
    return lock_path.with_name(lock_path.name + ".owner")


def _write_holder(lock_path: Path) -> None:
    import sys

    note = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S"),
            "command": " ".join(sys.argv)[:300]}
    try:
        _holder_path(lock_path).write_text(json.dumps(note))
    except OSError:
        pass


def _holder(lock_path: Path) -> str:
    try:
        note = json.loads(_holder_path(lock_path).read_text())
        return f"process {note['pid']} on {note['host']} since {note['since']}: {note['command']}"
    except (OSError, ValueError, KeyError):
        return f"the process holding {lock_path}"
