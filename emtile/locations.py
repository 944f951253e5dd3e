"""Where a store lives: a local path or an object-store URL (``s3://``, ``gs://``, ``https://``).

:class:`Location` is the one type every store operation can take: it opens a Zarr v3 store
(:meth:`Location.zarr_store`), names children (``loc / "labels/mask"``), lists, reads, writes and
deletes the objects under it, and compares itself with another location for the output rule
(an output that is, holds or lies inside an input is refused).

**Why fsspec (``zarr.storage.FsspecStore``), not obstore.** s3fs and gcsfs are the stores
Dask and zarr already speak; they read the endpoint and credentials from the standard places
themselves (botocore's chain for S3: ``AWS_ENDPOINT_URL`` / ``AWS_ENDPOINT_URL_S3``,
``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN``, ``AWS_PROFILE``,
``AWS_DEFAULT_REGION``, ``~/.aws/config``; google-auth's for GCS:
``GOOGLE_APPLICATION_CREDENTIALS``, the metadata server, gcloud's login), and s3fs exposes the
conditional put (``If-None-Match: *``) that the object-store lock needs
(:mod:`emtile.objlock`). HTTP(S) is fsspec's ``HTTPFileSystem`` (read only). obstore would be a
second I/O stack beside them for a speed that zarr's concurrent chunk requests already give.

**What travels.** A location carries only the options given explicitly
(``--storage-option KEY=VALUE``, :func:`parse_storage_options`), and those go to Dask workers
with the jobs (so give secrets through the environment, not as options); credentials from the
environment are read by s3fs / gcsfs in each process (the driver and every Dask worker), never
copied into a job. ``repr`` masks any option whose name looks like a secret.
"""

import atexit
import contextlib
import json
import os
import posixpath
import re
import weakref
from pathlib import Path

from emtile._errors import EmtileError

__all__ = ["Location", "at", "remote", "parse_storage_options", "SCHEMES", "READ_ONLY_SCHEMES",
           "is_url", "local_only"]

SCHEMES = ("s3", "gs", "http", "https")  # URLs a Location takes (local paths need none)
READ_ONLY_SCHEMES = ("http", "https")
_ALIASES = {"s3a": "s3", "gcs": "gs"}
_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://(.*)$")
_SECRET = re.compile(r"secret|password|token|key|credential|session", re.IGNORECASE)
_PROTOCOL_PACKAGE = {"s3": "s3fs (pip install 'emtile[s3]')",
                     "gs": "gcsfs (pip install 'emtile[gcs]')",
                     "http": "aiohttp (pip install aiohttp)", "https": "aiohttp (pip install aiohttp)"}


def is_url(text):
    """True for ``scheme://...`` text (any scheme; :class:`Location` checks which it takes)."""
    return isinstance(text, str) and _URL.match(text) is not None


def local_only(path, what, why):
    """Refuse, in one line, an object-store URL given where emtile reads or writes only local
    files (a model folder, a figure, a package, the stores ``emtile view`` serves): without
    this, ``s3://b/m`` would be taken as the local folder ``s3:/b/m``."""
    if path is not None and is_url(str(path)):
        raise EmtileError(f"{what} {str(path)!r} is a URL: {why}; give a local path")


def remote(path):
    """``path`` as a :class:`Location` when it is an object-store URL (or a Location of one),
    else None: the test every store function makes before its local code path."""
    if isinstance(path, Location):
        return None if path.is_local else path
    return Location(path) if is_url(path) else None


def at(where, storage_options=None):
    """What an entry point passes on: a URL (or a Location) as a :class:`Location` carrying
    ``storage_options``; anything else (a local path, an array, None) unchanged."""
    if isinstance(where, Location) or is_url(where):
        return Location(where, storage_options or None)
    return where


def parse_storage_options(items, *, keyword="storage_option"):
    """``["KEY=VALUE", ...]`` -> a dict of storage options for s3fs / gcsfs / fsspec.

    A value is read as JSON where it parses (``anon=true``, ``default_block_size=1048576``,
    ``config_kwargs={"max_pool_connections": 64}``), else kept as a string; a dotted key nests
    (``client_kwargs.region_name=eu-west-1`` -> ``{"client_kwargs": {"region_name": ...}}``).

    Raises
    ------
    EmtileError
        One line naming the item that is not ``KEY=VALUE``.
    """
    out = {}
    for item in items or ():
        key, sep, value = str(item).partition("=")
        parts = key.strip().split(".")
        if not sep or not all(p.strip() for p in parts):
            raise EmtileError(f"{keyword}={item!r} is not KEY=VALUE: give e.g. "
                              f"endpoint_url=http://127.0.0.1:9000 or anon=true")
        try:
            value = json.loads(value)
        except ValueError:
            pass
        node = out
        for p in parts[:-1]:
            node = node.setdefault(p.strip(), {})
            if not isinstance(node, dict):
                raise EmtileError(f"{keyword}={item!r} nests under {p!r}, which is already a "
                                  f"value; give each key once")
        node[parts[-1].strip()] = value
    return out


def _mask(options):
    return {k: (_mask(v) if isinstance(v, dict) else "***" if _SECRET.search(k) else v)
            for k, v in options.items()}


class Location:
    """A store's place: a local path or a URL, with the storage options that reach it.

    Parameters
    ----------
    where : str, Path or Location
        ``/data/vol.zarr``, ``s3://bucket/vol.zarr``, ``gs://bucket/vol.zarr``,
        ``https://host/vol.zarr`` (read only).
    storage_options : dict, optional
        Passed to the fsspec file system (see :func:`parse_storage_options`); none for a local
        path.

    A location is small, immutable and picklable (a job can carry it to Dask workers); equal
    locations are the same normalised place (scheme, bucket or host, key without ``.``, ``..``,
    doubled or trailing slashes).
    """

    __slots__ = ("scheme", "path", "storage_options")

    def __init__(self, where, storage_options=None):
        if isinstance(where, Location):
            storage_options = where.storage_options if storage_options is None else storage_options
            where = where.url
        text = str(where)
        m = _URL.match(text)
        if m is None:
            scheme, path = "file", str(Path(text))
        else:
            scheme = _ALIASES.get(m.group(1).lower(), m.group(1).lower())
            if scheme == "file":
                path = str(Path(m.group(2)))
            elif scheme not in SCHEMES:
                raise EmtileError(f"location {text!r} has scheme {m.group(1)!r}: give a local "
                                  f"path or an s3://, gs://, https:// or http:// URL")
            else:
                path = posixpath.normpath("/" + m.group(2)).lstrip("/")
                if not path or path == ".":
                    raise EmtileError(f"location {text!r} names no bucket or host: give e.g. "
                                      f"{scheme}://bucket/volume.zarr")
        if storage_options and scheme == "file":
            raise EmtileError(f"storage_options={sorted(storage_options)} apply to URLs only; "
                              f"location {text!r} is a local path")
        object.__setattr__(self, "scheme", scheme)
        object.__setattr__(self, "path", path)
        object.__setattr__(self, "storage_options", dict(storage_options or {}))

    def __setattr__(self, name, value):
        raise AttributeError("a Location is immutable")

    def __getstate__(self):
        return (self.scheme, self.path, self.storage_options)

    def __setstate__(self, state):
        for name, value in zip(self.__slots__, state):
            object.__setattr__(self, name, value)

    # ----------------------------------------------------------------- names

    @property
    def is_local(self):
        return self.scheme == "file"

    @property
    def read_only(self):
        return self.scheme in READ_ONLY_SCHEMES

    @property
    def url(self):
        """The path for a local location, ``scheme://key`` for a URL."""
        return self.path if self.is_local else f"{self.scheme}://{self.path}"

    @property
    def name(self):
        return posixpath.basename(self.path) if not self.is_local else Path(self.path).name

    @property
    def parent(self):
        if self.is_local:
            return Location(Path(self.path).parent)
        head = posixpath.dirname(self.path)
        if not head:
            raise EmtileError(f"location {self.url!r} is a bucket or host: it has no parent")
        return Location(f"{self.scheme}://{head}", self.storage_options)

    def __truediv__(self, child):
        child = str(child).strip("/")
        if self.is_local:
            return Location(Path(self.path) / child)
        return Location(f"{self.scheme}://{self.path}/{child}", self.storage_options)

    def sibling(self, name):
        """The location ``name`` beside this one (in the same folder or key prefix)."""
        return self.parent / name

    def __str__(self):
        return self.url

    def __repr__(self):
        opts = f", storage_options={_mask(self.storage_options)!r}" if self.storage_options else ""
        return f"Location({self.url!r}{opts})"

    def _key(self):
        if self.is_local:
            return ("file", os.path.realpath(self.path))
        return (self.scheme, self.path)

    def __eq__(self, other):
        return isinstance(other, Location) and self._key() == other._key()

    def __hash__(self):
        return hash(self._key())

    def relation(self, other):
        """How this location relates to ``other``: ``"is"``, ``"holds"``, ``"lies inside"`` or
        None (different places; a local path and a URL are always different)."""
        a, b = self._key(), Location(other)._key()
        if a[0] != b[0]:
            return None
        if a[1] == b[1]:
            return "is"
        sep = "/" if a[0] != "file" else os.sep
        if b[1].startswith(a[1].rstrip(sep) + sep):
            return "holds"
        if a[1].startswith(b[1].rstrip(sep) + sep):
            return "lies inside"
        return None

    # ----------------------------------------------------------------- access

    def filesystem(self):
        """The fsspec file system of this location (cached by fsspec per options)."""
        import fsspec

        protocol = self.scheme
        try:
            return fsspec.filesystem(protocol, **self.storage_options)
        except ImportError:
            raise EmtileError(f"location {self.url!r} needs {_PROTOCOL_PACKAGE[protocol]}") from None
        except TypeError as exc:
            raise EmtileError(f"storage_options={_mask(self.storage_options)} are not valid for "
                              f"{protocol}:// ({exc})") from None

    def _async_filesystem(self):
        import fsspec

        try:
            fs = fsspec.filesystem(self.scheme, asynchronous=True, **self.storage_options)
        except ImportError:
            raise EmtileError(f"location {self.url!r} needs {_PROTOCOL_PACKAGE[self.scheme]}") from None
        if self.scheme == "gs":
            _closed_at_exit(fs)
        return fs

    def zarr_store(self, mode="r"):
        """A Zarr v3 store object for ``zarr.open_group(store, mode=...)`` / ``zarr.open_array``.

        ``mode="r"`` gives a read-only store; any other mode a writable one (refused for
        ``http(s)://``). Local paths give ``zarr.storage.LocalStore``, URLs
        ``zarr.storage.FsspecStore`` over an asynchronous s3fs / gcsfs / HTTP file system.
        """
        import zarr.storage

        read_only = mode == "r"
        if not read_only and self.read_only:
            raise EmtileError(f"location {self.url!r} is read only ({self.scheme}://): write to "
                              f"a local path, s3:// or gs://")
        if self.is_local:
            return zarr.storage.LocalStore(self.path, read_only=read_only)
        path = self.path if self.scheme != "http" and self.scheme != "https" else self.url
        return zarr.storage.FsspecStore(self._async_filesystem(), read_only=read_only,
                                        path=path)

    def fs_path(self, name=""):
        """The path of ``name`` under this location as its file system names it (the local path;
        ``bucket/key`` for s3fs and gcsfs; the whole URL for HTTP)."""
        if self.is_local:
            return str(Path(self.path) / name) if name else self.path
        base = self.path if self.scheme not in READ_ONLY_SCHEMES else self.url
        return f"{base}/{name.strip('/')}" if name else base

    def exists(self, name=""):
        """Whether the object (or folder / key prefix) ``name`` under this location exists."""
        if self.is_local:
            return Path(self.fs_path(name)).exists()
        return self.filesystem().exists(self.fs_path(name))

    def keys(self):
        """Every object under this location, as keys relative to it (sorted); [] if none."""
        if self.is_local:
            root = Path(self.path)
            if not root.is_dir():
                return []
            return sorted(str(p.relative_to(root)).replace("\\", "/")
                          for p in root.rglob("*") if p.is_file())
        fs = self.filesystem()
        prefix = self.fs_path().rstrip("/") + "/"
        try:
            found = fs.find(prefix)
        except FileNotFoundError:
            return []
        return sorted(f[len(prefix):] for f in found if f.startswith(prefix))

    def read_bytes(self, name=""):
        """The object ``name`` under this location (or this location itself); None if absent."""
        try:
            if self.is_local:
                return Path(self.fs_path(name)).read_bytes()
            return self.filesystem().cat_file(self.fs_path(name))
        except FileNotFoundError:
            return None

    def write_bytes(self, data, name=""):
        """Write (replace whole) the object ``name`` under this location."""
        if self.read_only:
            raise EmtileError(f"location {self.url!r} is read only ({self.scheme}://)")
        if self.is_local:
            target = Path(self.fs_path(name))
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
        else:
            self.filesystem().pipe_file(self.fs_path(name), data)

    def read_json(self, name=""):
        data = self.read_bytes(name)
        return None if data is None else json.loads(data or b"{}")

    def write_json(self, doc, name=""):
        self.write_bytes(json.dumps(doc).encode(), name)

    def delete(self, names):
        """Delete the objects ``names`` (keys relative to this location); absent ones are fine."""
        names = list(names)
        if not names:
            return
        if self.is_local:
            for n in names:
                Path(self.fs_path(n)).unlink(missing_ok=True)
            return
        fs = self.filesystem()
        for i in range(0, len(names), 1000):  # S3 DeleteObjects takes up to 1000 keys
            try:
                fs.rm([self.fs_path(n) for n in names[i:i + 1000]])
            except FileNotFoundError:
                pass
        fs.invalidate_cache(self.fs_path())


_GCS_ASYNC = weakref.WeakSet()  # gcsfs file systems that zarr's event loop drives


def _closed_at_exit(fs):
    """Close ``fs``'s HTTP session on zarr's event loop when this process exits.

    gcsfs closes an asynchronous file system's session at exit on fsspec's loop, not on the
    loop it was opened on (zarr's), which fails and prints a traceback after the command's own
    output. Closing it first leaves gcsfs nothing to do. The first call registers the handler
    after forcing ``weakref``'s own exit hook to exist: ``atexit`` runs the later-registered
    handler first, so this one runs before gcsfs's finalizer."""
    if not getattr(_closed_at_exit, "registered", False):
        weakref.finalize(_closed_at_exit, lambda: None)
        atexit.register(_close_gcs_sessions)
        _closed_at_exit.registered = True
    _GCS_ASYNC.add(fs)


def _close_gcs_sessions():
    from zarr.core.sync import sync

    for fs in list(_GCS_ASYNC):
        session = getattr(fs, "_session", None)
        if session is not None and not session.closed:
            with contextlib.suppress(Exception):  # exiting anyway: a close that fails is moot
                sync(session.close(), timeout=2)
