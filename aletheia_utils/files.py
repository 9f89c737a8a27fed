"""Files and folders written so that a crash, a full disk or a kill never leaves one that looks complete but is not.

Every artifact of the package is written through `atomic_write`: the work goes to a hidden temporary name beside
the target (`.NAME.tmp-PID`, on the same file system, so the rename is atomic), which is flushed to disk and
renamed over the target only when the writing finished without an error. On an error the temporary is removed and
an `OSError` names the target (`[Errno 28] cannot write runs/x/06_gguf/model-Q8_0.gguf: No space left on device`).
A leaf module: the standard library only.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path


def temp_path(target: str | os.PathLike) -> Path:
    """The temporary name `atomic_write` uses for `target`: hidden, beside it, unique to this process."""
    target = Path(target)
    return target.with_name(f".{target.name}.tmp-{os.getpid()}")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def remove_stale(target: str | os.PathLike) -> list[Path]:
    """Remove temporaries of `target` left by processes that are gone (killed mid-write); return them."""
    target = Path(target)
    stale = []
    for tmp in target.parent.glob(f".{target.name}.tmp-*"):
        pid = tmp.name.rpartition(".tmp-")[2]
        if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            _remove(tmp)
            stale.append(tmp)
    return stale


def _fsync(path: Path) -> None:
    """Flush a file, or every file of a folder, to disk (before the rename makes it visible as complete)."""
    for f in ([path] if path.is_file() else [p for p in path.rglob("*") if p.is_file() and not p.is_symlink()]):
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_write(target: str | os.PathLike, *, replace: bool = True) -> Iterator[Path]:
    """`with atomic_write(target) as tmp:` write a file or a folder at `tmp`; it becomes `target` when the block
    ends without an error. A folder replaces an existing folder. With `replace=False` an existing `target` wins
    (another process made it first) and this copy is dropped. On an error nothing is left at either name; an
    `OSError` is raised again naming `target`. The parent folder is created; temporaries of killed processes are
    removed first."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(target)
    tmp = temp_path(target)
    _remove(tmp)
    try:
        yield tmp
        if not tmp.exists():
            raise FileNotFoundError(f"{target}: nothing was written (no {tmp.name})")
        _fsync(tmp)
        if target.exists() and not replace:
            _remove(tmp)
        elif tmp.is_dir() and target.is_dir():
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            target.rename(old)
            tmp.rename(target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    except OSError as e:
        _remove(tmp)
        if e.errno is None or str(target) in str(e):
            raise
        raise OSError(e.errno, f"cannot write {target}: {e.strerror or e}") from e
    except BaseException:
        _remove(tmp)
        raise


def write_text(target: str | os.PathLike, text: str) -> Path:
    """Write `text` (UTF-8) to `target` atomically."""
    with atomic_write(target) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(target)
