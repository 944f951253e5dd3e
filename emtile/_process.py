"""Facts about processes: whether the one a lock record names may still run (one rule for the
local lock, :func:`emtile.store.output_lock`, and the object-store lock, :mod:`emtile.objlock`),
and how many cores this one may use."""

import os
import socket


def pid_start(pid):
    """The process's start time in clock ticks since boot (Linux), or None."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def alive(holder):
    """Whether the recorded holder (``host``, ``pid``, ``pid_start``) may still run: a holder on
    another host counts as alive; here, a gone pid or a pid reused by a later process (another
    start time, whoever's it is) does not."""
    if holder.get("host") != socket.gethostname() or not isinstance(holder.get("pid"), int):
        return True
    pid = holder["pid"]
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: its start time tells
        pass
    start = holder.get("pid_start")
    return start is None or pid_start(pid) in (None, start)


def usable_cores():
    """The cores this process may run on (its CPU affinity on Linux, else the machine's)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1
