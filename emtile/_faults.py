"""Test-only fault injection: kill the process or fail a write at named points of a writer.

Private to emtile's own tests (``tests/test_faults.py``). Writers call :func:`point` at named
places; the environment variable ``_EMTILE_FAULTS``, read once when this module is imported, says
what happens there. Unset (the only state outside the tests) :func:`point` returns at once and
nothing else is touched.

``_EMTILE_FAULTS`` is a comma-separated list of

``POINT@N=ACTION``
    at the ``N``-th time (1-based) this process reaches ``POINT``: ``kill`` (SIGKILL itself),
    ``stop`` (SIGSTOP itself: a live run that makes no progress), or ``enospc`` / ``eacces`` /
    ``eio`` (raise that ``OSError``; it is raised again at every later hit, as a full disk stays
    full);
``trace=PATH``
    append every point reached, one ``POINT`` a line, to ``PATH`` (to enumerate kill points).

Named points (counts are per process):

``store.write``
    every key (chunk or metadata document) written through zarr's ``LocalStore``, just before
    it is written: faults "at the store layer", whichever emtile code writes;
``convert.slab``
    after each slab of a conversion is written (all levels);
``convert.before_complete``
    after the last slab and the label check, before the store is marked complete;
``store.removing``
    after a store being replaced is renamed away, before it is deleted;
``predict.read``
    before each group of input tiles is read: in this process (between forward passes, or in
    the reader thread), or in each DataLoader worker process (``--workers N``; they inherit the
    variable, and count their own hits);
``predict.block_written``
    a block's chunks written, its done-marker not yet (in the process that ran the block);
``predict.block_recorded``
    after the driver records a block as done;
``train.step``
    after each optimiser step;
``train.checkpoint``
    after a checkpoint (``last/``, and ``best/`` when it improved) is saved;
``train.write``
    just before each write into a training run's folder (``run.json``, a ``train.csv`` row,
    each file and rename of a model folder, the calibration of ``best/``): where ``enospc`` /
    ``eacces`` are injected for the trainer, which writes plain files, not Zarr.
"""

import errno
import os
import signal
import threading

ENV = "_EMTILE_FAULTS"
ACTIONS = ("kill", "stop", "enospc", "eacces", "eio")
_ERRNO = {"enospc": errno.ENOSPC, "eacces": errno.EACCES, "eio": errno.EIO}


def _parse(text):
    rules, trace = {}, None
    for item in filter(None, (s.strip() for s in text.split(","))):
        name, _, value = item.partition("=")
        if name == "trace":
            trace = value
            continue
        point, _, count = name.partition("@")
        if value not in ACTIONS or not count.isdigit() or int(count) < 1:
            raise ValueError(f"{ENV}: bad entry {item!r}; expected POINT@N=ACTION with N >= 1 "
                             f"and ACTION one of {', '.join(ACTIONS)}, or trace=PATH")
        rules.setdefault(point, []).append((int(count), value))
    return rules, trace


_RULES, _TRACE = _parse(os.environ.get(ENV, ""))
_ACTIVE = bool(_RULES) or _TRACE is not None
_COUNTS = {}


def plan(text):
    """Replace this process's plan by ``text`` (the ``_EMTILE_FAULTS`` syntax; "" for none) and
    restart the counts: for a process that is already running, such as one Dask worker."""
    global _RULES, _TRACE, _ACTIVE
    _RULES, _TRACE = _parse(text)
    _ACTIVE = bool(_RULES) or _TRACE is not None
    _COUNTS.clear()


def point(name):
    """A named point in a writer: does nothing unless ``_EMTILE_FAULTS`` plans a fault here."""
    if _ACTIVE:
        _reach(name)


def _reach(name):
    n = _COUNTS[name] = _COUNTS.get(name, 0) + 1
    if _TRACE is not None:
        with open(_TRACE, "a") as f:
            f.write(name + "\n")
    for count, action in _RULES.get(name, ()):
        if action == "kill" and n == count:
            os.kill(os.getpid(), signal.SIGKILL)
        elif action == "stop" and n == count:
            # to this thread, not the process: a process-directed SIGSTOP is taken by the main
            # thread, and the thread that sent it runs on until the main thread is scheduled to
            # stop the group (under load, long enough to write and record another block)
            signal.pthread_kill(threading.get_ident(), signal.SIGSTOP)
        elif action in _ERRNO and n >= count:
            code = _ERRNO[action]
            raise OSError(code, f"{os.strerror(code)} (injected at {name} #{n})")


def _arm_store():
    """Route every zarr ``LocalStore`` write through ``point("store.write")``."""
    from zarr.storage import LocalStore

    if getattr(LocalStore, "_emtile_faults", False):
        return
    for method in ("set", "set_if_not_exists"):
        original = getattr(LocalStore, method)

        async def wrapped(self, key, value, _original=original):
            point("store.write")
            return await _original(self, key, value)

        setattr(LocalStore, method, wrapped)
    LocalStore._emtile_faults = True


if _ACTIVE and (_TRACE is not None or any(p.startswith("store.") for p in _RULES)):
    _arm_store()
