"""`dadi supernode` as nodes and operators meet it: a real process on a free port in front of a real
docker-registry, spoken to over real HTTP (requests, and the node's own HttpChunkSource).

What reached the registry is counted by a forwarding proxy in between (tests/forward_proxy.py), which
is also what the supernode's --upstream-proxy is tested with. No assertion depends on timing: the
single-flight test holds the registry's answer at the proxy until the supernode's /metrics says every
request is waiting, and everything else polls with a deadline.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest
import requests
from conftest import REPO, dadi_cli, poll, pseudo_random
from forward_proxy import ForwardProxy
from prometheus_client.parser import text_string_to_metric_families
from registry_server import RegistryServer

from dadi.digests import sha256_digest
from dadi.image.dadi_layers import load_layer_tables
from dadi.image.transports import RegistryOptions, open_source, parse_image_ref
from dadi.node.fetch import HttpChunkSource, SourceError
from dadi.node.trace import Trace
from dadi.p2p.upstream import RETRIES as UPSTREAM_RETRIES
from dadi.registry import RegistryClient, basic_authorization
from dadi.registry.auth import Credentials

MiB = 1 << 20
START_DEADLINE = 30.0
STOP_DEADLINE = 15.0
REPO_NAME = "dadi/blobs"


# --- helpers ----------------------------------------------------------------------------------------


def clean_env(tmp_path: Path) -> dict[str, str]:
    """No credentials or proxies from this machine leak into the processes under test."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("REGISTRY_") and k.lower() not in ("http_proxy", "https_proxy", "all_proxy")}
    empty = tmp_path / "no-docker-config"
    empty.mkdir(exist_ok=True)
    env["DOCKER_CONFIG"] = str(empty)
    return env


class Supernode:
    """`dadi supernode` in a process of its own, listening on a free port; stopped on exit, by its pid."""

    def __init__(self, tmp_path: Path, registry: str, cache_dir: Path, *args: str, name: str = "supernode"):
        self.cmd = [str(REPO / ".venv" / "bin" / "dadi"), "supernode", "--listen", "127.0.0.1:0",
                    "--registry", registry, "--plain-http", "--cache-dir", str(cache_dir), *args]
        self.env = clean_env(tmp_path)
        self.log_path = tmp_path / f"{name}.log"
        self.process: subprocess.Popen | None = None
        self.url = ""

    def start(self) -> Supernode:
        offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(self.cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=self.env)
        deadline = time.monotonic() + START_DEADLINE
        while True:
            found = re.search(r"listening on (http://\S+)", self.log()[offset:])
            if found:
                self.url = found.group(1)
                return self
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise AssertionError(f"dadi supernode did not start:\n{self.log()}")
            time.sleep(0.05)  # a poll interval

    def stop(self, sig: int = signal.SIGTERM) -> int | None:
        process, self.process = self.process, None
        if process is None:
            return None
        if process.poll() is None:
            process.send_signal(sig)
            try:
                return process.wait(STOP_DEADLINE)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
                raise AssertionError(f"dadi supernode ignored signal {sig}:\n{self.log()}") from None
        return process.returncode

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def blob_url(self, digest: str, repository: str = REPO_NAME) -> str:
        return f"{self.url}/v2/{repository}/blobs/{digest}"

    def get(self, digest: str, range_: str | None = None, *, auth: str | None = None,
            repository: str = REPO_NAME, method: str = "GET") -> requests.Response:
        headers = {"Accept-Encoding": "identity"}
        if range_ is not None:
            headers["Range"] = range_
        if auth is not None:
            headers["Authorization"] = auth
        return requests.request(method, self.blob_url(digest, repository), headers=headers, timeout=60)

    def metric(self, name: str, **labels: str) -> float:
        text = requests.get(f"{self.url}/metrics", timeout=10).text
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                    return sample.value
        return 0.0

    def __enter__(self) -> Supernode:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def push_blob(registry: RegistryServer, data: bytes, *, repository: str = REPO_NAME,
              authfile: Path | None = None) -> str:
    digest = sha256_digest(data)
    with RegistryClient(registry.host, plain_http=True, authfile=str(authfile) if authfile else None) as client:
        client.put_blob(repository, digest, data, len(data))
    return digest


def disk_usage(root: Path) -> int:
    """What `du -s` counts: blocks allocated to every file and directory under root."""
    total = root.lstat().st_blocks * 512
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            total += os.lstat(os.path.join(dirpath, name)).st_blocks * 512
    return total


@pytest.fixture
def env(tmp_path, monkeypatch):
    """This test process, too, has no credentials but the ones a test hands out."""
    for key, value in clean_env(tmp_path).items():
        monkeypatch.setenv(key, value)
    for key in list(os.environ):
        if key.startswith("REGISTRY_") or key.lower() in ("http_proxy", "https_proxy", "all_proxy"):
            monkeypatch.delenv(key)


# --- ranges, metrics ---------------------------------------------------------------------------------


def test_ranges_are_the_registrys_bytes_and_metrics_count_what_was_sent(registry, tmp_path, env):
    data = pseudo_random("ranges", 2 * MiB + 123_457)
    digest = push_blob(registry, data)
    size = len(data)
    with Supernode(tmp_path, registry.host, tmp_path / "cache") as sn:
        assert requests.get(f"{sn.url}/healthz", timeout=10).json()["status"] == "ok"
        sent = sn.metric("dadi_supernode_sent_bytes_total")

        for range_, start, end in [
            ("bytes=0-99", 0, 100),
            (f"bytes={MiB - 10}-{MiB + 9}", MiB - 10, MiB + 10),  # across a piece boundary
            ("bytes=2000000-", 2000000, size),  # to the end
            ("bytes=-100", size - 100, size),  # the last 100 bytes
            (f"bytes=5-{size + 1000}", 5, size),  # past the end: clipped
        ]:
            resp = sn.get(digest, range_)
            assert resp.status_code == 206, resp.text
            assert resp.headers["Content-Range"] == f"bytes {start}-{end - 1}/{size}"
            assert resp.content == data[start:end]
            sent += end - start
            assert sn.metric("dadi_supernode_sent_bytes_total") == sent

        whole = sn.get(digest)
        assert whole.status_code == 200 and whole.content == data
        assert whole.headers["Docker-Content-Digest"] == digest
        sent += size
        head = sn.get(digest, method="HEAD")
        assert head.status_code == 200 and int(head.headers["Content-Length"]) == size and head.content == b""
        assert sn.metric("dadi_supernode_sent_bytes_total") == sent

        # What a node does: its chunk source, against the supernode instead of the registry.
        node = HttpChunkSource(sn.url, REPO_NAME, "supernode")
        try:
            assert node.fetch_range(digest, 1_500_000, 700_000, 10.0) == data[1_500_000:2_200_000]
        finally:
            node.close()

        beyond = sn.get(digest, f"bytes={size}-")
        assert beyond.status_code == 416 and beyond.headers["Content-Range"] == f"bytes */{size}"
        assert sn.get(digest, "bytes=0-1,5-6").status_code == 400
        missing = sn.get(sha256_digest(b"never pushed"), "bytes=0-9")
        assert missing.status_code == 404 and "no such blob" in missing.json()["error"]
        # Three pieces, each fetched from the registry once, every other read a hit.
        assert sn.metric("dadi_supernode_registry_fetches_total") == 3
        assert sn.metric("dadi_supernode_bytes_total", source="registry") == size
        assert sn.metric("dadi_supernode_piece_hits_total") > 0
        # All its pieces arrived: the blob is checked against its digest (in the background).
        poll("the blob's verification", lambda: sn.metric("dadi_supernode_verified_blobs_total") == 1)
        assert sn.stop(signal.SIGINT) == 0
    assert "stopped" in sn.log()


# --- single-flight, upstream proxy, upstream failures --------------------------------------------------


def test_concurrent_requests_for_one_piece_leave_the_registry_once(registry, tmp_path, env):
    data = pseudo_random("stampede", 3 * MiB)
    digest = push_blob(registry, data)
    nodes = 8
    with ForwardProxy() as proxy, \
            Supernode(tmp_path, registry.host, tmp_path / "cache", "--upstream-proxy", proxy.url) as sn:
        proxy.hold = threading.Event()
        results: dict[int, requests.Response] = {}

        def node(k: int) -> None:
            start = MiB + k * 64 * 1024  # each node wants another chunk of the same piece
            results[k] = sn.get(digest, f"bytes={start}-{start + 64 * 1024 - 1}")

        threads = [threading.Thread(target=node, args=(k,)) for k in range(nodes)]
        for t in threads:
            t.start()
        try:
            # The first request's fetch is held at the proxy; the others must all be waiting on it.
            assert proxy.held.acquire(timeout=30)
            poll("every other request to wait for the one registry fetch",
                 lambda: sn.metric("dadi_supernode_singleflight_waits_total") == nodes - 1)
        finally:
            proxy.hold.set()
            for t in threads:
                t.join()
        for k in range(nodes):
            start = MiB + k * 64 * 1024
            assert results[k].status_code == 206
            assert results[k].content == data[start : start + 64 * 1024]
        assert proxy.blob_gets() == [f"/v2/{REPO_NAME}/blobs/{digest}"]  # one GET, through the proxy
        heads = [path for method, path in proxy.requests if method == "HEAD"]
        assert len(heads) == 1  # the access check, shared too
        # Later requests for that piece are hits; the registry sees nothing new.
        assert sn.get(digest, f"bytes={MiB}-{2 * MiB - 1}").content == data[MiB : 2 * MiB]
        assert len(proxy.blob_gets()) == 1


def test_registry_failures_are_502_and_leave_nothing_cached(registry, tmp_path, env):
    data = pseudo_random("short reads", MiB + 4096)
    other = pseudo_random("another blob", 100_000)
    digest, other_digest = push_blob(registry, data), push_blob(registry, other)
    proxy = ForwardProxy().__enter__()
    try:
        with Supernode(tmp_path, registry.host, tmp_path / "cache", "--upstream-proxy", proxy.url) as sn:
            # The registry's answer breaks off half-way, also when the registry client tries again.
            proxy.cut_next = 1 + UPSTREAM_RETRIES
            resp = sn.get(digest, "bytes=0-99")
            assert resp.status_code == 502
            assert "bytes 0-1048575" in resp.json()["error"] and resp.content != data[:100]
            assert sn.metric("dadi_supernode_errors_total", kind="upstream") == 1
            assert len(proxy.blob_gets()) == 1 + UPSTREAM_RETRIES
            # Nothing was cached: the next request fetches the piece again, whole this time.
            assert sn.get(digest, "bytes=0-99").content == data[:100]
            assert len(proxy.blob_gets()) == 2 + UPSTREAM_RETRIES
            assert sn.get(other_digest).content == other

            proxy.__exit__(None, None, None)  # the way to the registry is gone
            assert sn.get(digest, "bytes=10-19").content == data[10:20]  # cached: still served
            down = sn.get(digest, f"bytes={MiB}-{MiB + 99}")  # the blob's second piece is not
            assert down.status_code == 502 and proxy.url.rpartition(":")[2] in down.json()["error"]
    finally:
        proxy.__exit__(None, None, None)


# --- the cache: quota, restart ------------------------------------------------------------------------


def test_the_cache_stays_within_its_quota_and_survives_a_restart(registry, tmp_path, env):
    blobs = [pseudo_random(f"quota {k}", 3 * MiB // 2) for k in range(5)]
    digests = [push_blob(registry, b) for b in blobs]
    quota = 4 * MiB
    cache = tmp_path / "cache"
    with ForwardProxy() as proxy:
        sn = Supernode(tmp_path, registry.host, cache, "--cache-quota", "4MiB", "--upstream-proxy", proxy.url)
        with sn:
            for data, digest in zip(blobs, digests, strict=True):
                assert sn.get(digest).content == data
                assert disk_usage(cache) <= quota
            assert sn.metric("dadi_supernode_evicted_blobs_total", reason="quota") >= 2
            assert sn.metric("dadi_supernode_cache_bytes") <= quota
            assert sn.stop() == 0
        assert "stopped" in sn.log()
        assert len(proxy.blob_gets()) == 10  # two pieces per blob

        with sn:
            # The most recent blob was kept, and is served without the registry.
            assert sn.get(digests[-1]).content == blobs[-1]
            assert len(proxy.blob_gets()) == 10
            # The least recent one was evicted: fetched again, and something else makes room.
            assert sn.get(digests[0]).content == blobs[0]
            assert len(proxy.blob_gets()) == 12
            assert disk_usage(cache) <= quota


# --- access ----------------------------------------------------------------------------------------------


def test_a_node_reads_through_the_supernode_only_what_the_registry_lets_it_read(tmp_path, env):
    users = {"alice": "alice-secret", "bob": "bob-secret"}
    with RegistryServer(tmp_path / "private", users=users) as private:
        alice_file = private.write_authfile(tmp_path / "alice.json", "alice")
        data = pseudo_random("private", MiB + 1000)
        digest = push_blob(private, data, authfile=alice_file)
        alice = basic_authorization(Credentials("alice", "alice-secret", "test"))
        bob = basic_authorization(Credentials("bob", "bob-secret", "test"))
        wrong = basic_authorization(Credentials("alice", "not-her-password", "test"))

        with Supernode(tmp_path, private.host, tmp_path / "cache") as sn:
            node = HttpChunkSource(sn.url, REPO_NAME, "supernode", authorization=alice)
            try:
                assert node.fetch_range(digest, 1000, 5000, 10.0) == data[1000:6000]
            finally:
                node.close()
            # The blob is cached now; that must not open it to anyone else.
            for auth in (None, wrong, "Bearer some-token"):
                refused = sn.get(digest, "bytes=1000-5999", auth=auth)
                assert refused.status_code == 401, refused.text
                assert refused.headers["WWW-Authenticate"].startswith("Basic ")
                assert data[1000:1100] not in refused.content and "error" in refused.json()
            anonymous = HttpChunkSource(sn.url, REPO_NAME, "supernode")
            try:
                with pytest.raises(SourceError, match="HTTP 401"):
                    anonymous.fetch_range(digest, 0, 100, 10.0)
            finally:
                anonymous.close()
            assert sn.metric("dadi_supernode_access_checks_total", result="denied") >= 2

        # A supernode with credentials of its own fetches with those, but still checks every node's.
        with Supernode(tmp_path, private.host, tmp_path / "cache2", "--authfile", str(alice_file),
                       name="supernode-with-credentials") as sn:
            assert sn.get(digest, "bytes=0-99", auth=bob).content == data[:100]
            assert sn.get(digest, "bytes=0-99").status_code == 401
            assert sn.get(digest, "bytes=0-99", auth=wrong).status_code == 401


# --- prewarm ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dadi_image(busybox_image, tmp_path_factory):
    """The busybox test image, converted into a registry of its own for this module's tests."""
    layout, tag = busybox_image
    root = tmp_path_factory.mktemp("prewarm-registry")
    with RegistryServer(root / "registry") as server:
        ref = f"{server.host}/dadi/busybox:v1"
        dadi_cli("convert", f"oci:{layout}:{tag}", f"docker://{ref}", "--plain-http",
                 "--cache-dir", str(root / "convert-cache"), "-q")
        source = open_source(parse_image_ref(f"docker://{ref}"), RegistryOptions(plain_http=True))
        manifest = source.get_manifest()
        yield server, ref, manifest, source
        source.close()


def prewarm(sn: Supernode, image: str, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    return dadi_cli("prewarm", image, "--supernode", sn.url, *args, check=check, env=sn.env)


@pytest.mark.needs_root  # the busybox test image is built with umoci as root
def test_prewarm_fills_the_cache_so_that_nodes_never_wait_for_the_registry(dadi_image, tmp_path, env):
    registry, ref, manifest, _ = dadi_image
    blobs = [manifest.config, *manifest.layers]
    total = sum(d.size for d in blobs)
    with ForwardProxy() as proxy, \
            Supernode(tmp_path, registry.host, tmp_path / "cache", "--upstream-proxy", proxy.url) as sn:
        result = prewarm(sn, ref, "--json")
        summary = json.loads(result.stdout)
        assert summary["event"] == "done"
        assert summary["bytes_done"] == summary["bytes_total"] == summary["bytes_fetched"] == total
        assert "cached" in result.stderr  # the progress line's summary
        fetched = len(proxy.blob_gets())

        # Every byte of every blob, as a node reads it: all from the cache, none from the registry.
        hits = sn.metric("dadi_supernode_piece_hits_total")
        repository = ref.partition("/")[2].rpartition(":")[0]
        node = HttpChunkSource(sn.url, repository, "supernode")
        try:
            for desc in blobs:
                got = node.fetch_range(desc.digest, 0, desc.size, 30.0)
                assert sha256_digest(got) == desc.digest
        finally:
            node.close()
        assert len(proxy.blob_gets()) == fetched
        assert sn.metric("dadi_supernode_piece_hits_total") > hits

        # Again, named without the registry host: nothing left to fetch.
        again = json.loads(prewarm(sn, "dadi/busybox:v1", "--json", "-q").stdout)
        assert again["bytes_done"] == total and again["bytes_fetched"] == 0
        assert len(proxy.blob_gets()) == fetched

        refused = prewarm(sn, "elsewhere.example:5000/dadi/busybox:v1", check=False)
        assert refused.returncode == 1 and "serves the registry" in refused.stderr


@pytest.mark.needs_root  # the busybox test image is built with umoci as root
def test_a_trace_only_prewarm_fetches_the_traced_chunks_and_the_tables(dadi_image, tmp_path, env):
    registry, ref, manifest, source = dadi_image
    layer0, layer1 = manifest.layers[0], manifest.layers[1]
    assert layer0.size > MiB and layer1.size > MiB  # two pieces each: the test needs a piece left out
    chunk = load_layer_tables(source, layer0).chunks[0]
    repository = ref.partition("/")[2].rpartition(":")[0]
    with ForwardProxy() as proxy, \
            Supernode(tmp_path, registry.host, tmp_path / "cache", "--upstream-proxy", proxy.url) as sn:
        none_yet = prewarm(sn, ref, "--trace-only", check=False)
        assert none_yet.returncode == 1 and "no trace stored" in none_yet.stderr

        trace_file = tmp_path / "start.trace"
        trace_file.write_bytes(Trace((layer0.digest,), ((0, 0),), 30.0).to_json())
        dadi_cli("trace", "push", f"docker://{ref}", str(trace_file), "--plain-http", env=sn.env)
        summary = json.loads(prewarm(sn, ref, "--trace-only", "--json").stdout)
        everything = manifest.config.size + sum(d.size for d in manifest.layers)
        assert 0 < summary["bytes_total"] < everything
        fetched = len(proxy.blob_gets())

        node = HttpChunkSource(sn.url, repository, "supernode")
        try:
            # The traced chunk: local. Layer 1's first piece holds neither traced chunks nor tables: fetched now.
            assert sha256_digest(node.fetch_range(layer0.digest, chunk.offset, chunk.length, 30.0)) == \
                "sha256:" + chunk.sha256.hex()
            assert len(proxy.blob_gets()) == fetched
            node.fetch_range(layer1.digest, 0, 100, 30.0)
            assert len(proxy.blob_gets()) == fetched + 1
        finally:
            node.close()
