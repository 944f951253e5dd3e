"""The object-store layer against real servers started here: moto's S3 server on 127.0.0.1
(``tests/s3server.py``), fake-gcs-server (``tests/gcsserver.py``) and ``http.server`` for
``https://``-style reads; locations, Zarr v3 through them, the conditional-put lock (on S3 and
GCS), ordered removal, a Dask LocalCluster on the same URL."""

import functools
import http.server
import json
import os
import pickle
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pytest
import zarr

from emtile import EmtileError, store
from emtile.locations import Location, parse_storage_options
from emtile.objlock import ObjectLock, lock_location, object_lock
from emtile.objremove import remove_store, removal_order
from emtile.volume import open_input, open_volume

from objstores import bucket, gcs, gcs_server, s3, s3_server  # noqa: F401  (pytest fixtures)

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


# --------------------------------------------------------------------------- names, options


def test_storage_options_parse_json_strings_and_nested_keys():
    got = parse_storage_options(["anon=true", "endpoint_url=http://127.0.0.1:9000",
                                 "client_kwargs.region_name=eu-west-1",
                                 "config_kwargs={\"max_pool_connections\": 64}", "n=3", "s=a=b"])
    assert got == {"anon": True, "endpoint_url": "http://127.0.0.1:9000",
                   "client_kwargs": {"region_name": "eu-west-1"},
                   "config_kwargs": {"max_pool_connections": 64}, "n": 3, "s": "a=b"}


@pytest.mark.parametrize("item", ["anon", "=3", "a..b=1"])
def test_a_bad_storage_option_is_one_line(item):
    with pytest.raises(EmtileError, match=r"^storage_option=.* is not KEY=VALUE: give e\.g\.") as e:
        parse_storage_options([item])
    assert "\n" not in str(e.value)


def test_locations_normalise_and_relate():
    a = Location("s3://bucket/a//b/../vol.zarr/")
    assert a.url == "s3://bucket/a/vol.zarr" and a == Location("s3a://bucket/a/vol.zarr")
    assert (a / "labels/mask").url == "s3://bucket/a/vol.zarr/labels/mask"
    assert a.parent.url == "s3://bucket/a" and a.name == "vol.zarr"
    assert a.relation("s3://bucket/a/vol.zarr") == "is"
    assert a.relation("s3://bucket/a/vol.zarr/0") == "holds"
    assert a.relation("s3://bucket/a") == "lies inside"
    assert a.relation("s3://bucket/a/vol.zarr2") is None  # a prefix of the key is not a folder
    assert a.relation("s3://other/a/vol.zarr") is None
    assert a.relation("gs://bucket/a/vol.zarr") is None
    assert Location("/tmp/x/vol.zarr").relation("/tmp/x/vol.zarr/../vol.zarr/0") == "holds"
    assert a.relation("/bucket/a/vol.zarr") is None  # a local path is never a URL
    assert Location("https://host:8000/d/v.zarr").read_only


@pytest.mark.parametrize("where, match", [
    ("ftp://host/v.zarr", r"^location 'ftp://host/v.zarr' has scheme 'ftp': give a local path"),
    ("s3://", r"^location 's3://' names no bucket or host"),
])
def test_bad_locations_are_one_line(where, match):
    with pytest.raises(EmtileError, match=match):
        Location(where)


def test_a_location_pickles_and_hides_secrets():
    loc = Location("s3://b/v.zarr", {"endpoint_url": "http://e", "secret": "hunter2",
                                     "client_kwargs": {"aws_session_token": "tok"}})
    back = pickle.loads(pickle.dumps(loc))
    assert back == loc and back.storage_options == loc.storage_options
    assert "hunter2" not in repr(loc) and "tok'" not in repr(loc) and "http://e" in repr(loc)
    from emtile.locations import at

    assert at("s3://b/v.zarr", {"anon": True}).storage_options == {"anon": True}
    assert at("/tmp/v.zarr", {"anon": True}) == "/tmp/v.zarr" and at(None) is None
    with pytest.raises(EmtileError, match="apply to URLs only"):
        Location("/tmp/v.zarr", {"anon": True})


# --------------------------------------------------------------------------- Zarr through S3


def _write_group(where, data):
    group = zarr.open_group(where.zarr_store("w"), mode="w-", zarr_format=3,
                            attributes={"emtile": {"complete": False}})
    arr = group.create_array("0", shape=data.shape, chunks=(2, 16, 16), dtype=data.dtype)
    arr[:] = data
    return group


def test_zarr_through_s3_is_the_same_bytes_as_on_disk(s3, tmp_path, rng):
    data = rng.integers(0, 60000, size=(5, 40, 37), dtype=np.uint16)
    local, remote = Location(tmp_path / "v.zarr"), Location(s3 / "v.zarr")
    _write_group(local, data)
    _write_group(remote, data)
    assert remote.keys() == local.keys() and "0/c/2/2/2" in remote.keys()
    for key in local.keys():
        if not key.endswith("zarr.json"):
            assert remote.read_bytes(key) == local.read_bytes(key), key
    back = zarr.open_group(remote.zarr_store("r"), mode="r")["0"]
    np.testing.assert_array_equal(back[:], data)
    with pytest.raises(Exception):  # a read-only store refuses writes
        zarr.open_group(remote.zarr_store("r"), mode="r")["0"][0, 0, 0] = 1


def test_create_image_and_open_volume_take_an_s3_url(s3):
    """``store.create_image`` opens ``str(path)`` with zarr, whose URL handling reads the
    environment's endpoint: it works for s3:// today (without ``--storage-option``)."""
    url = s3 / "img.zarr"
    group = store.create_image(url, (3, 32, 32), np.uint8, chunks=(1, 16, 16),
                               voxel_size=(30, 4, 4), levels=2)
    group["0"][:] = 7
    with pytest.raises(EmtileError, match=r"writer has not finished"):
        open_input(url)
    store.mark_complete(group)
    assert store.is_complete(url)
    vol, path = open_input(Location(url))
    assert isinstance(path, Location) and vol.shape == (3, 32, 32)
    assert (vol[1:2, 3:20, 5:9] == 7).all()
    assert open_volume(url + "/1").shape == (3, 16, 16)
    with pytest.raises(EmtileError, match=r"^input 's3://.*/nothing.zarr' does not exist"):
        open_volume(s3 / "nothing.zarr")


def test_zarr_v2_inputs_open_locally_and_on_a_bucket(bucket, tmp_path, rng):
    """emtile writes Zarr v3 and opens a store as v3 first (one metadata read); many public
    volumes are v2, which then opens as zarr finds it."""
    data = rng.integers(0, 255, size=(3, 40, 50), dtype=np.uint8)
    for where in (str(tmp_path / "v2.zarr"), bucket / "v2.zarr"):
        group = zarr.open_group(Location(where).zarr_store("w"), mode="w", zarr_format=2)
        group.create_array("0", shape=data.shape, chunks=(1, 32, 32), dtype=data.dtype)[:] = data
        np.testing.assert_array_equal(open_volume(where)[:], data)  # the group's array "0"
        np.testing.assert_array_equal(open_volume(where + "/0")[1:2], data[1:2])
    with pytest.raises(EmtileError, match=r"does not exist"):
        open_volume(bucket / "nothing.zarr")


# --------------------------------------------------------------------------- the lock


_RACER = textwrap.dedent("""
    import sys, time
    from emtile import EmtileError
    from emtile.objlock import object_lock
    start = float(sys.argv[2])
    time.sleep(max(0.0, start - time.time()))
    try:
        with object_lock(sys.argv[1], heartbeat=0.5):
            print("won", flush=True)
            time.sleep(1.5)
    except EmtileError as exc:
        print("refused", exc, flush=True)
""")


def test_two_processes_racing_for_one_output_one_wins(bucket):
    url = bucket / "out.zarr"
    start = time.time() + 3  # both interpreters are up by then: they put at the same moment
    procs = [subprocess.Popen([sys.executable, "-c", _RACER, url, str(start)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=60) for p in procs]
    lines = sorted(o[0].strip() for o in outs)
    assert [line.split()[0] for line in lines] == ["refused", "won"], outs
    assert f"output {url!r} is being written by another emtile run (pid " in lines[0]
    assert not lock_location(url).exists()  # the winner released it


def test_a_live_lock_refuses_and_release_frees_it(bucket):
    url = bucket / "out.zarr"
    with object_lock(url, heartbeat=0.3) as held:
        first, etag = lock_location(url).read_json(), held.etag
        assert first["token"] == held.token and first["pid"] == os.getpid()
        time.sleep(0.8)  # the heartbeat rewrites the record: a new ETag each time
        assert held.etag != etag and lock_location(url).read_json()["token"] == held.token
        with pytest.raises(EmtileError, match=rf"^output '{url}' is being written by another "
                                              rf"emtile run \(pid {os.getpid()} on "):
            with object_lock(url):
                pass
        held.check()
    assert not lock_location(url).exists()
    with object_lock(url):
        pass


def test_a_stale_lock_is_taken_over(bucket):
    url = bucket / "out.zarr"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()
    import socket

    where = lock_location(url)
    where.write_json({"pid": int(dead), "host": socket.gethostname(), "token": "old"})
    with object_lock(url) as lock:  # a dead pid on this host: at once
        assert where.read_json()["token"] == lock.token
    where.write_json({"pid": 1, "host": "elsewhere", "token": "old", "heartbeat": 0.1})
    with pytest.raises(EmtileError, match="elsewhere"):
        with object_lock(url, stale_after=100):
            pass
    time.sleep(1.0)  # ten missed heartbeats of 0.1 s, by the server's LastModified
    with object_lock(url, stale_after=5) as lock:
        assert where.read_json()["token"] == lock.token


def test_a_run_whose_lock_was_taken_over_finds_out(bucket):
    url = bucket / "out.zarr"
    with object_lock(url, heartbeat=0.2) as lock:
        lock_location(url).write_json({"pid": 2, "host": "elsewhere", "token": "thief"})
        time.sleep(0.8)
        with pytest.raises(EmtileError, match=r"this run's lock was taken over by pid 2 on "
                                              r"elsewhere.*left incomplete"):
            lock.check()
    assert lock_location(url).read_json()["token"] == "thief"  # not ours to delete


def test_a_write_that_landed_but_whose_answer_was_lost_keeps_the_lock(bucket):
    """A client retries a put whose first try landed and gets "precondition failed" (the
    object now exists / changed): the record read back is this run's own, so the run holds
    the lock rather than refusing itself or calling it taken over."""
    url = bucket / "out.zarr"
    lock = ObjectLock(url, heartbeat=60)
    put = lock.backend.put

    def answer_lost(data, **conditions):
        put(data, **conditions)
        return None

    lock.backend.put = answer_lost
    lock.acquire()
    try:
        assert lock_location(url).read_json()["token"] == lock.token
        lock.check()  # the heartbeat's rewrite, answer lost too
        assert lock.lost_to is None and lock_location(url).read_json()["beats"] == 1
        lock.backend.put = put
        lock.check()  # and the next rewrite goes through on the generation / ETag read back
        assert lock_location(url).read_json()["beats"] == 2
    finally:
        lock.release()
    assert not lock_location(url).exists()


def test_http_outputs_cannot_be_locked():
    with pytest.raises(EmtileError, match=r"^output 'https://h/v.zarr': emtile can lock only "
                                          r"s3:// and gs:// outputs"):
        with object_lock("https://h/v.zarr"):
            pass


# --------------------------------------------------------------------------- removal


def _complete_store(loc, rng):
    group = _write_group(loc, rng.integers(0, 9, size=(4, 32, 32), dtype=np.uint8))
    group.create_array("emtile_blocks", shape=(8,), chunks=(4,), dtype="uint8")[:] = 1
    work = group.create_group("emtile_segment")
    work.create_array("labels", shape=(8,), chunks=(8,), dtype="uint32")[:] = 3
    group.attrs["emtile"] = {"format": 1, "kind": "image", "complete": True,
                             "fingerprints": {"predict": {"x": 1}}}
    return group


class _Killed(BaseException):
    pass


@pytest.mark.parametrize("kill_at", [0, 1, 2, 3])
def test_a_killed_removal_never_leaves_a_complete_or_resumable_store(s3, rng, monkeypatch,
                                                                     kill_at):
    loc = Location(s3 / "old.zarr")
    _complete_store(loc, rng)
    assert store.is_complete(loc.url)
    real, calls = Location.delete, []

    def delete(self, names):
        if len(calls) == kill_at:
            raise _Killed
        calls.append(list(names))
        real(self, names)

    monkeypatch.setattr(Location, "delete", delete)
    with pytest.raises(_Killed):
        remove_store(loc)
    monkeypatch.setattr(Location, "delete", real)
    meta = store.emtile_attrs(loc.url)
    assert meta == {"format": 1, "kind": "image", "complete": False, "removing": True}
    assert not store.is_complete(loc.url)
    if kill_at >= 1:  # the markers' metadata went first
        assert not loc.exists("emtile_blocks/zarr.json")
        assert not loc.exists("emtile_segment/labels/zarr.json")
    remove_store(loc)  # the next run finishes it
    assert loc.keys() == []


def test_removal_order_and_refusals(s3):
    keys = ["0/c/0", "zarr.json", "emtile_blocks/c/0", "emtile_blocks/zarr.json", "0/zarr.json",
            "emtile_recut/emtile_blocks/c/0", "emtile_recut/zarr.json"]
    assert removal_order(keys) == ["emtile_blocks/zarr.json", "emtile_recut/zarr.json",
                                   "emtile_blocks/c/0", "emtile_recut/emtile_blocks/c/0",
                                   "0/c/0", "0/zarr.json"]
    from emtile.markers import MARKERS
    from emtile.objremove import _MARKER_PREFIXES
    from emtile.segmenter.blocks import TEMP
    from emtile.segmenter.recut import WORK

    assert set(_MARKER_PREFIXES) == {MARKERS, TEMP, WORK}  # every working group emtile writes
    loc = Location(s3 / "notes")
    loc.write_bytes(b"keep me", "a.txt")
    with pytest.raises(EmtileError, match=r"^refusing to delete 's3://.*/notes': it is not a Zarr"):
        remove_store(loc)
    assert loc.read_bytes("a.txt") == b"keep me"


# --------------------------------------------------------------------------- https, Dask


@pytest.fixture
def http_root(tmp_path):
    """``tmp_path`` served read-only by ``http.server`` on 127.0.0.1, in a thread."""
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    handler.log_message = lambda *a, **k: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield tmp_path, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_an_http_read_of_a_local_store(http_root, rng):
    pytest.importorskip("aiohttp")
    folder, base = http_root
    data = rng.integers(0, 255, size=(3, 40, 40), dtype=np.uint8)
    group = store.create_image(folder / "v.zarr", data.shape, np.uint8, chunks=(1, 16, 16))
    group["0"][:] = data
    store.mark_complete(group)
    vol, _ = open_input(f"{base}/v.zarr")
    np.testing.assert_array_equal(vol[:], data)
    with pytest.raises(EmtileError, match=r"^location 'http://.*' is read only \(http://\)"):
        Location(f"{base}/w.zarr").zarr_store("w")


def _double_block(loc, z):
    """A Dask task: read slice ``z`` of the store at ``loc`` and write it back doubled."""
    arr = zarr.open_group(loc.zarr_store("r+"), mode="r+")["0"]
    arr[z] = arr[z] * 2
    return int(arr[z].sum())


def test_a_local_cluster_reads_and_writes_s3(s3, rng, monkeypatch):
    distributed = pytest.importorskip("distributed")
    import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    data = rng.integers(0, 100, size=(4, 32, 32), dtype=np.uint16)
    loc = Location(s3 / "v.zarr", {"endpoint_url": s3.endpoint})
    monkeypatch.delenv("AWS_ENDPOINT_URL")  # the workers reach the server only through the
    _write_group(loc, data)                 # options the Location carries
    with distributed.LocalCluster(n_workers=1, threads_per_worker=1, processes=True,
                                  host="127.0.0.1", dashboard_address=None) as cluster, \
            distributed.Client(cluster) as client:
        sums = client.gather([client.submit(_double_block, loc, z, pure=False)
                              for z in range(4)])
        pids = set(client.run(os.getpid).values())
    assert os.getpid() not in pids
    back = zarr.open_group(loc.zarr_store("r"), mode="r")["0"][:]
    np.testing.assert_array_equal(back, data * 2)
    assert sums == [int(s) for s in (data * 2).reshape(4, -1).sum(axis=1)]


def test_the_content_token_of_an_s3_input_follows_its_chunks(s3, rng):
    from emtile.markers import content_token

    data = rng.integers(0, 9, size=(4, 32, 32), dtype=np.uint8)
    loc = Location(s3 / "in.zarr")
    arr = _write_group(loc, data)["0"]
    token = content_token(loc.url)
    assert content_token(loc) == token and len(token) == 64
    (loc / "notes").write_bytes(b"x", "a.txt")  # not the array read: no change
    assert content_token(loc.url) == token
    arr[1, :16, :16] = data[1, :16, :16] + 1
    assert content_token(loc.url) != token


@pytest.mark.parametrize("argv, what", [
    (["train", "--raw", "raw.zarr", "--labels", "lab.zarr", "--out", "s3://b/run",
      "--train-slices", "0:2"], "out"),
    (["show", "raw.zarr", "--output", "gs://b/fig.png"], "output"),
    (["export", "model", "s3://b/model.zip"], "path"),
    (["export", "gs://b/model", "model.zip"], "model"),
    (["predict", "raw.zarr", "pred.zarr", "--model", "s3://b/model"], "model"),
    (["view", "s3://b/raw.zarr", "--no-browser"], "raw"),
])
def test_a_url_where_only_a_local_path_works_is_one_line(argv, what, tmp_path, monkeypatch):
    """Before any work and without touching the network; nothing is made on local disk (a
    URL taken as a path would be the folder ``s3:/b/...``)."""
    from click.testing import CliRunner

    from emtile.cli.main import main

    monkeypatch.chdir(tmp_path)
    r = CliRunner().invoke(main, argv)
    assert r.exit_code == 1 and r.output.count("\n") == 1, r.output
    assert r.output.startswith(f"Error: {what} '") and "is a URL: " in r.output, r.output
    assert r.output.rstrip().endswith("give a local path"), r.output
    assert list(tmp_path.iterdir()) == []


def test_the_storage_option_flag_parses_and_refuses_in_one_line():
    import click
    from click.testing import CliRunner

    from emtile.cli._storage import storage_option

    @click.command()
    @storage_option()
    def show(storage_options):
        click.echo(json.dumps(storage_options, sort_keys=True))

    ok = CliRunner().invoke(show, ["--storage-option", "anon=true",
                                   "--storage-option", "client_kwargs.region_name=eu-west-1"])
    assert ok.exit_code == 0 and json.loads(ok.output) == {
        "anon": True, "client_kwargs": {"region_name": "eu-west-1"}}
    assert json.loads(CliRunner().invoke(show, []).output) == {}
    bad = CliRunner().invoke(show, ["--storage-option", "anon"])
    assert bad.exit_code == 2
    assert "Invalid value for '--storage-option': 'anon' is not KEY=VALUE" in bad.output
