"""One run per out_dir: an advisory lock (flock) on ``out_dir/run.lock``, held for the run's life.

The kernel releases a flock when its holder exits, however it exits (SIGKILL included), so a stale lock file
never blocks a later run; the file keeps the holder's PID and host for the error of a second run."""
from __future__ import annotations

import contextlib
import fcntl
import os
import socket

from .errors import ConfigError, RunDirBusyError

LOCK_NAME = "run.lock"


@contextlib.contextmanager
def hold(out_dir: str):
    """Create ``out_dir`` and hold its lock until the block ends; RunDirBusyError naming the holder when another
    live process has it, ConfigError when the folder cannot be created or written."""
    path = os.path.join(out_dir, LOCK_NAME)
    try:
        os.makedirs(out_dir, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise ConfigError(f"cannot create or write out_dir {out_dir} ({exc.strerror}: {exc.filename}): set out_dir "
                          "to a folder you can write") from exc
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 256, 0).decode(errors="replace").strip()
            who = f"PID {holder}" if holder else "a process that is starting"
            raise RunDirBusyError(f"out_dir {out_dir} is in use by another run ({who}): wait for it to end, or "
                                  "choose another out_dir") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock
