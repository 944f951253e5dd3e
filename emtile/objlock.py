"""One live run per output on an object store, where there is no ``flock`` and no rename.

The lock of ``s3://bucket/path/vol.zarr`` is the object ``s3://bucket/path/.vol.zarr.emtile-lock``
beside the store (the local lock's name, :func:`emtile.store.lock_path`), so replacing the store
never removes it. It holds a JSON record: host, pid, the pid's start time, the run's start, a
random token, the heartbeat interval and the time of the last beat.

- **Acquire** is a conditional create: S3 ``PutObject`` with ``If-None-Match: *`` (AWS since
  2024; MinIO, Ceph and moto honour it). Of any number of racing runs exactly one create
  succeeds; the others get ``412 Precondition Failed`` (or ``409 ConditionalRequestConflict``)
  and read the winner's record.
- **Heartbeat**: a daemon thread rewrites the record every ``heartbeat`` seconds with
  ``If-Match: <its last ETag>``. If that fails, another run has taken the lock over (this one
  was stale: suspended, cut off); :meth:`ObjectLock.check` then raises, and the run must not
  mark its output complete.
- **Stale** holders are taken over by a conditional overwrite (``If-Match`` the ETag read): a
  holder on this host whose pid is dead at once; any holder whose record's ``LastModified``
  (the server's clock) is older than ``stale_after`` heartbeats (this host's clock: a clock
  ahead by more than that would take a live lock, so keep hosts on NTP). Two runs taking over
  the same stale record: one ``If-Match`` succeeds, the other is refused.
- **Release** deletes the record only while it is still this run's (token read back, then
  ``DeleteObject`` with ``If-Match``).

On GCS (``gs://``) the same four steps use object generations instead of ETags: create with
``ifGenerationMatch=0``, beat and take over with ``ifGenerationMatch=<generation read>``,
release with a ``DELETE`` under the same condition; the record's age comes from the
``Last-Modified`` of the server's read.
"""

import contextlib
import datetime
import email.utils
import functools
import json
import os
import socket
import threading
import uuid

from emtile._errors import EmtileError
from emtile._process import alive, pid_start
from emtile.locations import Location

__all__ = ["object_lock", "ObjectLock", "lock_location", "HEARTBEAT", "STALE_AFTER"]

HEARTBEAT = 10.0  # seconds between rewrites of the record
STALE_AFTER = 6  # heartbeats without a rewrite after which a record is stale
LOCK_SUFFIX = ".emtile-lock"


def lock_location(output):
    """The lock object of ``output``: ``.NAME.emtile-lock`` beside it."""
    output = Location(output)
    return output.sibling(f".{output.name}{LOCK_SUFFIX}")


def _now():
    return datetime.datetime.now(datetime.timezone.utc)


def _dead_here(holder):
    """True only when the holder ran on this host and its process is gone (or its pid reused)."""
    return holder.get("host") == socket.gethostname() and not alive(holder)


@functools.lru_cache(maxsize=None)
def _check_botocore():
    """Refuse, in one line, a botocore too old to send the conditions (it would drop them and
    every run would win)."""
    import botocore
    import botocore.session

    model = botocore.session.get_session().get_service_model("s3")
    put = model.operation_model("PutObject").input_shape.members
    delete = model.operation_model("DeleteObject").input_shape.members
    if not {"IfNoneMatch", "IfMatch"} <= set(put) or "IfMatch" not in delete:
        raise EmtileError(f"botocore {botocore.__version__} cannot send conditional writes, "
                          f"which the lock of an s3:// output needs: pip install -U s3fs "
                          f"aiobotocore")


class _S3:
    """The four conditional operations on one S3 object, through s3fs's client."""

    def __init__(self, loc):
        _check_botocore()
        self.fs = loc.filesystem()
        self.bucket, self.key, _ = self.fs.split_path(loc.path)

    def _call(self, method, **kwargs):
        return self.fs.call_s3(method, Bucket=self.bucket, Key=self.key, **kwargs)

    @staticmethod
    def _conflict(exc):
        """Whether s3fs's error is a failed condition (412) or a concurrent conditional write
        (409): botocore's response rides on ``__cause__``."""
        if isinstance(exc, FileExistsError):
            return True
        response = getattr(exc.__cause__, "response", None) or {}
        code = response.get("Error", {}).get("Code")
        status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        return code in ("PreconditionFailed", "ConditionalRequestConflict") or status in (409, 412)

    def put(self, data, *, if_none_match=False, if_match=None):
        """The new ETag, or None when the condition failed."""
        cond = {"IfNoneMatch": "*"} if if_none_match else {"IfMatch": if_match} if if_match else {}
        try:
            return self._call("put_object", Body=data, **cond)["ETag"]
        except OSError as exc:
            if self._conflict(exc):
                return None
            raise

    def get(self):
        """``(bytes, etag, last_modified)`` or None when the object is absent."""
        from fsspec.asyn import sync

        async def read():
            resp = await self.fs._call_s3("get_object", Bucket=self.bucket, Key=self.key)
            async with resp["Body"] as body:
                return await body.read(), resp["ETag"], resp["LastModified"]

        try:
            return sync(self.fs.loop, read)
        except FileNotFoundError:
            return None

    def delete(self, etag):
        try:
            self._call("delete_object", IfMatch=etag)
        except FileNotFoundError:
            pass
        except OSError as exc:
            if not self._conflict(exc):
                raise


class _GCS:
    """The same four operations on one GCS object through gcsfs's JSON API calls; the object's
    generation plays the ETag's part (``ifGenerationMatch``, where 0 means "absent")."""

    _BOUNDARY = "emtile-lock-record"

    def __init__(self, loc):
        self.fs = loc.filesystem()
        self.bucket, self.key, _ = self.fs.split_path(loc.path)

    def _quoted(self):
        from urllib.parse import quote

        return quote(self.bucket, safe=""), quote(self.key, safe="")

    def put(self, data, *, if_none_match=False, if_match=None):
        """The new generation, or None when the condition failed (gcsfs raises 412 as
        ``FileExistsError``). A multipart upload: the media upload ignores the condition on
        some servers."""
        cond = {"ifGenerationMatch": "0"} if if_none_match else (
            {"ifGenerationMatch": str(if_match)} if if_match else {})
        meta = json.dumps({"name": self.key, "contentType": "application/json"})
        body = (f"--{self._BOUNDARY}\r\nContent-Type: application/json; charset=UTF-8\r\n\r\n"
                f"{meta}\r\n--{self._BOUNDARY}\r\nContent-Type: application/json\r\n\r\n"
                ).encode() + data + f"\r\n--{self._BOUNDARY}--".encode()
        bucket, _ = self._quoted()
        try:
            done = self.fs.call(
                "POST", f"{self.fs._location}/upload/storage/v1/b/{bucket}/o",
                uploadType="multipart", data=body, json_out=True,
                headers={"Content-Type": f'multipart/related; boundary="{self._BOUNDARY}"'},
                **cond)
        except FileExistsError:
            return None
        return str(done["generation"])

    def get(self):
        """``(bytes, generation, last_modified)`` or None when the object is absent."""
        bucket, key = self._quoted()
        try:
            headers, data = self.fs.call(
                "GET", f"{self.fs._location}/download/storage/v1/b/{bucket}/o/{key}",
                alt="media")
        except FileNotFoundError:
            return None
        modified = email.utils.parsedate_to_datetime(headers["Last-Modified"])
        return data, headers["X-Goog-Generation"], modified

    def delete(self, generation):
        bucket, key = self._quoted()
        try:
            self.fs.call("DELETE", f"{self.fs._location}/storage/v1/b/{bucket}/o/{key}",
                         ifGenerationMatch=str(generation))
        except (FileNotFoundError, FileExistsError):  # gone, or no longer ours: leave it
            pass


def _backend(loc, output):
    if loc.scheme == "s3":
        return _S3(loc)
    if loc.scheme == "gs":
        return _GCS(loc)
    raise EmtileError(f"output {output.url!r}: emtile can lock only s3:// and gs:// outputs on "
                      f"an object store, not {loc.scheme}://; write there or to a local path")


class ObjectLock:
    """A held lock (see the module docstring); made by :func:`object_lock`."""

    def __init__(self, output, *, heartbeat=HEARTBEAT, stale_after=STALE_AFTER):
        self.output = Location(output)
        self.where = lock_location(self.output)
        self.heartbeat = float(heartbeat)
        self.stale_after = float(stale_after)
        self.backend = _backend(self.where, self.output)
        self.token = uuid.uuid4().hex
        self.etag = None
        self.lost_to = None  # the record that replaced ours, once the heartbeat finds one
        self._stop = threading.Event()
        self._renewing = threading.Lock()  # the heartbeat and check() rewrite the record
        self._thread = None

    def _record(self):
        pid = os.getpid()
        return {"pid": pid, "host": socket.gethostname(), "pid_start": pid_start(pid),
                "started": self._started, "beat": _now().isoformat(timespec="milliseconds"),
                "beats": self._beats,  # every rewrite differs, so has a new ETag
                "heartbeat": self.heartbeat, "output": self.output.url, "token": self.token}

    def _stale(self, holder, modified):
        if _dead_here(holder):
            return True
        interval = holder.get("heartbeat", self.heartbeat)
        interval = float(interval) if isinstance(interval, (int, float)) else self.heartbeat
        return (_now() - modified).total_seconds() > self.stale_after * interval

    def acquire(self):
        """Take the lock or raise :class:`EmtileError` naming the output and the live holder."""
        self._started = _now().astimezone().isoformat(timespec="seconds")
        self._beats = 0
        for _ in range(5):
            data = json.dumps(self._record()).encode()
            self.etag = self.backend.put(data, if_none_match=True)
            if self.etag is not None:
                break
            found = self.backend.get()
            if found is None:
                continue  # released between our put and our read: try again
            raw, etag, modified = found
            try:
                holder = json.loads(raw or b"{}")
            except ValueError:
                holder = {}
            if holder.get("token") == self.token:  # ours: a retried put whose first try landed
                self.etag = etag
                break
            if not self._stale(holder, modified):
                raise EmtileError(_busy(self.output, self.where, holder, self.stale_after))
            self.etag = self.backend.put(data, if_match=etag)  # take over: one run wins
            if self.etag is not None:
                break
        else:
            raise EmtileError(f"could not take the lock {self.where.url!r} of output "
                              f"{self.output.url!r}: it keeps changing; is another emtile run "
                              f"starting on it?")
        self._thread = threading.Thread(target=self._beat, name="emtile-lock-heartbeat",
                                        daemon=True)
        self._thread.start()
        return self

    def _renew(self):
        """Rewrite our record if it is still ours (``If-Match``); False once another run has
        taken the lock over (``lost_to`` then names it). Store errors propagate."""
        with self._renewing:
            if self.lost_to is not None:
                return False
            self._beats += 1
            etag = self.backend.put(json.dumps(self._record()).encode(), if_match=self.etag)
            if etag is None:
                found = self.backend.get()
                holder = json.loads(found[0] or b"{}") if found else {}
                if holder.get("token") == self.token:  # a retried put whose first try landed
                    self.etag = found[1]
                    return True
                self.lost_to = holder
                return False
            self.etag = etag
            return True

    def _beat(self):
        while not self._stop.wait(self.heartbeat):
            try:
                if not self._renew():
                    return
            except Exception:  # noqa: BLE001 - unreachable for now: the next beat tries again
                continue

    def check(self):
        """Renew the lock now and raise if another run has taken it over (call before the
        output's last changes: removing working data, marking it complete). A run that was
        suspended past the stale limit finds out here, not at its next heartbeat."""
        try:
            self._renew()
        except OSError as exc:
            raise EmtileError(f"output {self.output.url!r}: could not renew this run's lock "
                              f"{self.where.url!r} ({exc}); the output is left incomplete: run "
                              f"the same command again to finish it") from None
        if self.lost_to is not None:
            raise EmtileError(
                f"output {self.output.url!r}: this run's lock was taken over by "
                f"{_who(self.lost_to)} after it missed {self.stale_after:g} heartbeats; the "
                f"output is left incomplete")

    def release(self):
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self.lost_to is not None:
            return
        found = self.backend.get()
        if found is not None and json.loads(found[0] or b"{}").get("token") == self.token:
            self.backend.delete(found[1])


def _who(holder):
    if not holder:
        return "a run that has not written its record yet"
    return (f"pid {holder.get('pid')} on {holder.get('host')}, started {holder.get('started')}, "
            f"last heartbeat {holder.get('beat')}")


def _busy(output, where, holder, stale_after):
    return (f"output {output.url!r} is being written by another emtile run ({_who(holder)}); "
            f"wait for it to finish or stop it, then run again (if that run is gone, its lock "
            f"{where.url!r} is taken over once it has missed {stale_after:g} heartbeats, or "
            f"delete it)")


@contextlib.contextmanager
def object_lock(output, *, heartbeat=HEARTBEAT, stale_after=STALE_AFTER):
    """Hold ``output``'s lock on an object store while writing it (see the module docstring).

    Yields
    ------
    ObjectLock
        Call ``.check()`` before marking the output complete.

    Raises
    ------
    EmtileError
        If another live run holds the lock, or the store cannot be locked (``http(s)://``).
    """
    lock = ObjectLock(output, heartbeat=heartbeat, stale_after=stale_after).acquire()
    try:
        yield lock
    finally:
        lock.release()
