"""The registry client against a real docker-registry on loopback, and against small stand-in servers
for what a well-behaved registry never does (lie about digests, fail with 5xx, break a stream)."""

from __future__ import annotations

import hashlib
import io
import json
import subprocess
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from conftest import pseudo_random
from registry_server import RegistryServer, write_authfile

from dadi.errors import DadiError, ImageError, RegistryError
from dadi.registry import RegistryClient, RegistryRef, parse_registry_ref

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER = "application/vnd.docker.image.rootfs.diff.tar.gzip"


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@pytest.fixture(autouse=True)
def no_ambient_credentials(tmp_path, monkeypatch):
    # The machine's own ~/.docker/config.json must not change what these tests see.
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path / "docker-config-unused"))
    monkeypatch.delenv("REGISTRY_AUTH_FILE", raising=False)


@pytest.fixture
def client(registry):
    with RegistryClient(registry.host, plain_http=True, backoff=0.01) as c:
        yield c


def push_image(
    client: RegistryClient,
    repo: str,
    ref: str,
    *,
    docker: bool = False,
    arch: str = "amd64",
    variant: str | None = None,
) -> tuple[bytes, str]:
    """Push config + one layer + manifest (OCI or Docker schema2); returns (manifest bytes, digest)."""
    config = json.dumps(
        {"architecture": arch, "os": "linux", "rootfs": {"type": "layers", "diff_ids": []}}
    ).encode()
    layer = pseudo_random(hash(arch) % 1000, 3000)
    for blob in (config, layer):
        client.put_blob(repo, sha(blob), blob, len(blob))
    manifest = {
        "schemaVersion": 2,
        "mediaType": DOCKER_MANIFEST if docker else OCI_MANIFEST,
        "config": {
            "mediaType": DOCKER_CONFIG if docker else OCI_CONFIG,
            "digest": sha(config),
            "size": len(config),
        },
        "layers": [
            {"mediaType": DOCKER_LAYER if docker else OCI_LAYER, "digest": sha(layer), "size": len(layer)}
        ],
    }
    body = json.dumps(manifest, indent=1).encode()
    digest = client.put_manifest(repo, ref, body, manifest["mediaType"])
    return body, digest


# ---- references ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected", "canonical"),
    [
        (
            "127.0.0.1:5000/dadi/busybox:v1",
            RegistryRef("127.0.0.1:5000", "dadi/busybox", "v1", None),
            "127.0.0.1:5000/dadi/busybox:v1",
        ),
        ("localhost/app", RegistryRef("localhost", "app", "latest", None), "localhost/app:latest"),
        (
            "busybox",
            RegistryRef("registry-1.docker.io", "library/busybox", "latest", None),
            "docker.io/library/busybox:latest",
        ),
        (
            "docker.io/me/tool:1.2",
            RegistryRef("registry-1.docker.io", "me/tool", "1.2", None),
            "docker.io/me/tool:1.2",
        ),
        (
            "docker://quay.io/a/b@sha256:" + "ab" * 32,
            RegistryRef("quay.io", "a/b", None, "sha256:" + "ab" * 32),
            "quay.io/a/b@sha256:" + "ab" * 32,
        ),
    ],
)
def test_reference_parses_to_host_repository_tag_digest(text, expected, canonical):
    ref = parse_registry_ref(text)
    assert ref == expected
    assert str(ref) == canonical
    assert parse_registry_ref(str(ref)) == ref


@pytest.mark.parametrize(
    ("text", "complaint"),
    [
        ("", "empty"),
        ("host.io/Upper/case", "invalid repository component 'Upper'"),
        ("host.io/repo:bad tag", "whitespace"),
        ("host.io/repo@sha256:1234", "not a sha256 digest"),
        ("host.io/", "no repository"),
        ("host.io/repo:-x", "invalid tag"),
    ],
)
def test_malformed_reference_is_refused_with_the_reason(text, complaint):
    with pytest.raises(ImageError, match=complaint):
        parse_registry_ref(text)


# ---- blobs -----------------------------------------------------------------------------------------


def test_monolithic_blob_push_then_pull_and_second_push_is_skipped(client):
    data = pseudo_random(0, 100_000)
    digest = sha(data)
    assert client.head_blob("dadi/one", digest) is None
    assert client.put_blob("dadi/one", digest, data, len(data)) == "uploaded"
    assert client.head_blob("dadi/one", digest) == len(data)
    assert client.get_blob("dadi/one", digest) == data
    assert client.put_blob("dadi/one", digest, data, len(data)) == "exists"


@pytest.mark.parametrize("source_kind", ["path", "stream"])
def test_chunked_upload_from_file_or_stream_arrives_whole(client, tmp_path, source_kind):
    data = pseudo_random(7, 10_017)
    digest = sha(data)
    path = tmp_path / "blob"
    path.write_bytes(data)
    if source_kind == "path":
        status = client.put_blob("dadi/chunks", digest, path, len(data), chunk_size=4096)
    else:
        with path.open("rb") as stream:
            status = client.put_blob("dadi/chunks", digest, stream, len(data), chunk_size=4096)
    assert status == "uploaded"
    with client.open_blob("dadi/chunks", digest) as stream:
        assert stream.read() == data


def test_range_reads_return_exactly_the_bytes_asked_for(client):
    data = pseudo_random(3, 50_000)
    digest = sha(data)
    client.put_blob("dadi/ranges", digest, data, len(data))
    assert client.get_blob("dadi/ranges", digest, offset=12_345, length=4096) == data[12_345 : 12_345 + 4096]
    assert client.get_blob("dadi/ranges", digest, offset=49_990) == data[49_990:]
    assert client.get_blob("dadi/ranges", digest, offset=0, length=1) == data[:1]
    assert client.get_blob("dadi/ranges", digest, offset=10, length=0) == b""
    with pytest.raises(RegistryError, match="asked for 100 bytes at offset 49950, got 50"):
        client.get_blob("dadi/ranges", digest, offset=49_950, length=100)
    with pytest.raises(RegistryError, match="416"):
        client.get_blob("dadi/ranges", digest, offset=60_000, length=10)


def test_the_environments_proxy_settings_are_followed_on_every_request(registry, monkeypatch):
    # The client's session reads them once per host (dadi.registry.client.RegistrySession), not per request.
    from forward_proxy import ForwardProxy

    data = pseudo_random(4, 50_000)
    digest = sha(data)
    with RegistryClient(registry.host, plain_http=True) as client:  # the test proxy forwards only reads
        client.put_blob("dadi/proxied", digest, data, len(data))
    with ForwardProxy() as proxy:
        monkeypatch.setenv("HTTP_PROXY", proxy.url)
        monkeypatch.setenv("NO_PROXY", "")
        with RegistryClient(registry.host, plain_http=True) as client:
            for offset in (0, 100, 200):
                assert client.get_blob("dadi/proxied", digest, offset=offset, length=10) == data[offset:offset + 10]
        assert len(proxy.blob_gets()) == 3
        monkeypatch.setenv("NO_PROXY", registry.host.partition(":")[0])
        with RegistryClient(registry.host, plain_http=True) as client:
            assert client.get_blob("dadi/proxied", digest, offset=0, length=10) == data[:10]
        assert len(proxy.blob_gets()) == 3, "a host in NO_PROXY is reached directly"


def test_absent_blob_is_none_on_head_and_a_named_error_on_get(client):
    digest = sha(b"never pushed")
    assert client.head_blob("dadi/empty", digest) is None
    with pytest.raises(RegistryError) as info:
        client.get_blob("dadi/empty", digest)
    assert "dadi/empty" in str(info.value) and digest in str(info.value) and "404" in str(info.value)


def test_cross_repository_mount_sends_no_bytes_and_falls_back_when_absent(client):
    data = pseudo_random(11, 20_000)
    digest = sha(data)
    client.put_blob("dadi/base", digest, data, len(data))
    assert client.put_blob("dadi/derived", digest, data, len(data), mount_from="dadi/base") == "mounted"
    assert client.get_blob("dadi/derived", digest) == data
    other = pseudo_random(12, 777)
    # Not in the source repository: the registry opens an upload session instead, and we use it.
    assert (
        client.put_blob("dadi/derived", sha(other), other, len(other), mount_from="dadi/base") == "uploaded"
    )
    assert client.get_blob("dadi/derived", sha(other)) == other


def test_upload_with_wrong_digest_is_refused_by_the_registry(client):
    data = b"the bytes"
    wrong = sha(b"other bytes")
    with pytest.raises(RegistryError) as info:
        client.put_blob("dadi/bad", wrong, data, len(data))
    message = str(info.value)
    assert wrong in message and "DIGEST_INVALID" in message and "400" in message
    assert client.head_blob("dadi/bad", wrong) is None


def test_upload_whose_size_does_not_match_the_source_is_refused_before_sending(client, tmp_path):
    path = tmp_path / "f"
    path.write_bytes(b"12345")
    with pytest.raises(RegistryError, match=r"has 5 bytes, but size says 6"):
        client.put_blob("dadi/bad", sha(b"12345"), path, 6)


# ---- manifests -------------------------------------------------------------------------------------


@pytest.mark.parametrize("docker", [False, True], ids=["oci", "docker-schema2"])
def test_manifest_push_and_pull_by_tag_and_digest(client, docker):
    body, digest = push_image(client, "dadi/app", "v1", docker=docker)
    assert digest == sha(body)
    for reference in ("v1", digest):
        manifest = client.get_manifest("dadi/app", reference)
        assert manifest.body == body
        assert manifest.digest == digest
        assert manifest.media_type == (DOCKER_MANIFEST if docker else OCI_MANIFEST)


def test_missing_manifest_error_names_repository_and_tag(client):
    with pytest.raises(RegistryError) as info:
        client.get_manifest("dadi/nothing", "v9")
    assert "dadi/nothing:v9" in str(info.value) and "not found" in str(info.value)


@pytest.mark.parametrize("docker", [False, True], ids=["oci-index", "docker-manifest-list"])
def test_index_resolves_to_the_requested_platform(client, docker):
    amd_body, amd_digest = push_image(client, "dadi/multi", "amd-only", docker=docker, arch="amd64")
    arm_body, arm_digest = push_image(client, "dadi/multi", "arm-only", docker=docker, arch="arm64")
    manifest_type = DOCKER_MANIFEST if docker else OCI_MANIFEST
    index = {
        "schemaVersion": 2,
        "mediaType": DOCKER_LIST if docker else OCI_INDEX,
        "manifests": [
            {
                "mediaType": manifest_type,
                "digest": amd_digest,
                "size": len(amd_body),
                "platform": {"os": "linux", "architecture": "amd64"},
            },
            {
                "mediaType": manifest_type,
                "digest": arm_digest,
                "size": len(arm_body),
                "platform": {"os": "linux", "architecture": "arm64", "variant": "v8"},
            },
        ],
    }
    index_body = json.dumps(index).encode()
    client.put_manifest("dadi/multi", "latest", index_body, index["mediaType"])

    assert client.get_manifest("dadi/multi", "latest").digest == amd_digest  # linux/amd64 by default
    assert client.get_manifest("dadi/multi", "latest", platform="linux/arm64").body == arm_body
    assert client.get_manifest("dadi/multi", "latest", platform="linux/aarch64/v8").digest == arm_digest
    whole = client.get_manifest("dadi/multi", "latest", platform=None)
    assert whole.body == index_body and whole.media_type == index["mediaType"]
    with pytest.raises(
        ImageError, match=r"no manifest for platform linux/s390x; it has linux/amd64, linux/arm64/v8"
    ):
        client.get_manifest("dadi/multi", "latest", platform="linux/s390x")


def test_skopeo_pushed_image_reads_back(client, registry, tmp_path):
    # An image written by the real tools (umoci, skopeo) is what a converter meets in practice.
    layout = tmp_path / "layout"
    subprocess.run(["umoci", "init", "--layout", str(layout)], check=True)
    subprocess.run(["umoci", "new", "--image", f"{layout}:t"], check=True)
    subprocess.run(
        [
            "skopeo",
            "copy",
            "--quiet",
            "--dest-tls-verify=false",
            f"oci:{layout}:t",
            f"docker://{registry.host}/tools/empty:t",
        ],
        check=True,
    )
    manifest = client.get_manifest("tools/empty", "t")
    assert manifest.media_type == OCI_MANIFEST
    config = manifest.json()["config"]
    config_bytes = client.get_blob("tools/empty", config["digest"])
    assert json.loads(config_bytes)["os"] == "linux"


# ---- auth against a real registry -------------------------------------------------------------------


@pytest.fixture
def auth_registry(tmp_path):
    with RegistryServer(tmp_path / "auth-registry", users={"alice": "secret"}) as server:
        yield server


def test_htpasswd_registry_works_with_the_authfile_skopeo_also_reads(auth_registry, tmp_path):
    authfile = auth_registry.write_authfile(tmp_path / "auth.json")
    with RegistryClient(auth_registry.host, plain_http=True, authfile=str(authfile)) as client:
        body, digest = push_image(client, "private/app", "v1")
        assert client.get_manifest("private/app", "v1").digest == digest
    # The same file, read by skopeo: the format is the one the real tools write and read.
    out = subprocess.run(
        [
            "skopeo",
            "inspect",
            "--raw",
            "--tls-verify=false",
            "--authfile",
            str(authfile),
            f"docker://{auth_registry.host}/private/app:v1",
        ],
        check=True,
        capture_output=True,
    ).stdout
    assert out == body


@pytest.mark.parametrize("how", ["docker_config", "registry_auth_file"])
def test_credentials_come_from_the_environment_like_docker_and_podman(
    auth_registry, tmp_path, monkeypatch, how
):
    if how == "docker_config":
        auth_registry.write_authfile(tmp_path / "dockercfg" / "config.json")
        monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path / "dockercfg"))
    else:
        monkeypatch.setenv("REGISTRY_AUTH_FILE", str(auth_registry.write_authfile(tmp_path / "podman.json")))
    with RegistryClient(auth_registry.host, plain_http=True) as client:
        assert client.put_blob("private/env", sha(b"x"), b"x", 1) == "uploaded"


def test_no_credentials_is_a_clear_unauthorized_error(auth_registry, tmp_path):
    empty = tmp_path / "empty.json"
    empty.write_text("{}")
    with RegistryClient(auth_registry.host, plain_http=True, authfile=str(empty)) as client:
        with pytest.raises(RegistryError) as info:
            client.get_manifest("private/app", "v1")
    message = str(info.value)
    assert message.startswith("unauthorized:")
    assert f"no credentials for {auth_registry.host} in {empty}" in message
    assert "UNAUTHORIZED" in message


def test_wrong_password_is_a_clear_unauthorized_error(auth_registry, tmp_path):
    authfile = write_authfile(tmp_path / "auth.json", auth_registry.host, "alice", "wrong")
    with RegistryClient(auth_registry.host, plain_http=True, authfile=str(authfile)) as client:
        with pytest.raises(RegistryError) as info:
            client.put_blob("private/app", sha(b"x"), b"x", 1)
    message = str(info.value)
    assert message.startswith("unauthorized:")
    assert f"credentials of user 'alice' for {auth_registry.host} from {authfile}" in message


def test_missing_or_broken_authfile_is_named(auth_registry, tmp_path):
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    for path, complaint in ((tmp_path / "absent.json", "no such file"), (broken, "not valid JSON")):
        with RegistryClient(auth_registry.host, plain_http=True, authfile=str(path)) as client:
            with pytest.raises(DadiError, match=complaint) as info:
                client.head_blob("private/app", sha(b"x"))
        assert str(path) in str(info.value)


# ---- connection trouble with the real registry -------------------------------------------------------


def test_registry_restart_loses_nothing_and_a_dead_registry_is_a_clear_error(registry, client):
    data = pseudo_random(0, 5000)
    client.put_blob("dadi/persist", sha(data), data, len(data))
    registry.stop()
    with RegistryClient(registry.host, plain_http=True, retries=1, backoff=0.01) as impatient:
        with pytest.raises(
            RegistryError,
            match=rf"HEAD http://{registry.host}/v2/.* failed after 2 attempt\(s\): .*Connection refused",
        ):
            impatient.head_blob("dadi/persist", sha(data))
    registry.start()
    assert client.get_blob("dadi/persist", sha(data)) == data


def test_https_against_a_plain_http_registry_suggests_plain_http(registry):
    with RegistryClient(registry.host, retries=0) as client:
        with pytest.raises(RegistryError, match="--plain-http"):
            client.head_blob("dadi/x", sha(b"x"))


# ---- stand-in servers for misbehaviour ----------------------------------------------------------------


class FakeServer:
    """A tiny HTTP server on 127.0.0.1 in a thread. `app(method, path, headers, body)` returns
    (status, headers, body) or (status, headers, body, cut_after) to drop the connection after cut_after
    bytes of body. Every request is recorded as (method, path, headers)."""

    def __init__(self, app):
        self.app = app
        self.requests: list[tuple[str, str, dict[str, str]]] = []
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def _handle(self):
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                headers = {k.lower(): v for k, v in self.headers.items()}
                fake.requests.append((self.command, self.path, headers))
                status, out_headers, out_body, *cut = fake.app(self.command, self.path, headers, body)
                self.send_response(status)
                for key, value in out_headers.items():
                    self.send_header(key, value)
                if "Content-Length" not in out_headers:
                    self.send_header("Content-Length", str(len(out_body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(out_body[: cut[0]] if cut else out_body)

            do_GET = do_HEAD = do_PUT = do_POST = do_PATCH = _handle

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.host = f"127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.02,), daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc_info):
        self.server.shutdown()
        self.server.server_close()
        self.thread.join()

    def paths(self, method: str | None = None) -> list[str]:
        return [p for m, p, _ in self.requests if method is None or m == method]


def fake_client(server: FakeServer, **kwargs) -> RegistryClient:
    return RegistryClient(server.host, plain_http=True, backoff=0.01, **kwargs)


GOOD_MANIFEST = json.dumps({"schemaVersion": 2, "mediaType": OCI_MANIFEST, "layers": []}).encode()
OTHER_MANIFEST = json.dumps({"schemaVersion": 2, "mediaType": OCI_MANIFEST, "layers": [], "x": 1}).encode()


def test_lying_registry_manifest_digest_header_names_expected_and_actual():
    def app(method, path, headers, body):
        return (
            200,
            {"Content-Type": OCI_MANIFEST, "Docker-Content-Digest": sha(GOOD_MANIFEST)},
            OTHER_MANIFEST,
        )

    with FakeServer(app) as server, fake_client(server) as client:
        with pytest.raises(RegistryError) as info:
            client.get_manifest("r", "v1")
    assert f"expected {sha(GOOD_MANIFEST)}, got {sha(OTHER_MANIFEST)}" in str(info.value)


def test_lying_registry_manifest_by_digest_names_expected_and_actual():
    def app(method, path, headers, body):
        return 200, {"Content-Type": OCI_MANIFEST}, OTHER_MANIFEST  # no header to give it away

    with FakeServer(app) as server, fake_client(server) as client:
        with pytest.raises(RegistryError) as info:
            client.get_manifest("r", sha(GOOD_MANIFEST))
    assert f"expected {sha(GOOD_MANIFEST)}, got {sha(OTHER_MANIFEST)}" in str(info.value)


def test_lying_registry_blob_is_caught_whole_and_streamed():
    right, wrong = pseudo_random(1, 70_000), pseudo_random(2, 70_000)

    def app(method, path, headers, body):
        return 200, {"Content-Type": "application/octet-stream"}, wrong

    with FakeServer(app) as server, fake_client(server) as client:
        with pytest.raises(RegistryError, match=f"expected {sha(right)}, got {sha(wrong)}"):
            client.get_blob("r", sha(right))
        with client.open_blob("r", sha(right)) as stream:
            assert stream.read(1000) == wrong[:1000]  # bytes flow; the verdict comes at the end
            with pytest.raises(RegistryError, match=f"expected {sha(right)}, got {sha(wrong)}"):
                stream.read()


def test_broken_blob_stream_resumes_with_a_range_request_and_verifies():
    data = pseudo_random(5, 200_000)

    def app(method, path, headers, body):
        if "range" not in headers:
            return 200, {}, data, 50_000  # the connection drops after 50,000 bytes
        start = int(headers["range"].removeprefix("bytes=").split("-")[0])
        return 206, {"Content-Range": f"bytes {start}-{len(data) - 1}/{len(data)}"}, data[start:]

    with FakeServer(app) as server, fake_client(server) as client:
        with client.open_blob("r", sha(data)) as stream:
            got = io.BytesIO()
            while chunk := stream.read(16384):
                got.write(chunk)
        assert got.getvalue() == data
        ranges = [h.get("range") for m, _, h in server.requests]
        assert ranges[0] is None and ranges[1].startswith("bytes=") and int(ranges[1][6:].split("-")[0]) > 0


def test_blob_stream_that_always_breaks_is_a_clear_error():
    data = pseudo_random(6, 10_000)

    def app(method, path, headers, body):
        if "range" in headers:
            start = int(headers["range"].removeprefix("bytes=").split("-")[0])
            return 206, {"Content-Range": f"bytes {start}-{len(data) - 1}/{len(data)}"}, data[start:], 0
        return 200, {}, data, 4000

    with FakeServer(app) as server, fake_client(server, retries=2) as client:
        with (
            client.open_blob("r", sha(data)) as stream,
            pytest.raises(RegistryError, match="connection broke after 4000 bytes"),
        ):
            stream.read()


def test_5xx_is_retried_until_the_registry_recovers():
    failures = {"left": 2}

    def app(method, path, headers, body):
        if failures["left"]:
            failures["left"] -= 1
            return (
                503,
                {"Content-Type": "application/json"},
                b'{"errors":[{"code":"UNAVAILABLE","message":"busy"}]}',
            )
        return 200, {"Content-Type": OCI_MANIFEST, "Docker-Content-Digest": sha(GOOD_MANIFEST)}, GOOD_MANIFEST

    with FakeServer(app) as server, fake_client(server) as client:
        assert client.get_manifest("r", "v1").body == GOOD_MANIFEST
        assert server.paths("GET") == ["/v2/r/manifests/v1"] * 3


def test_5xx_that_persists_reports_the_registry_text():
    def app(method, path, headers, body):
        return (
            500,
            {"Content-Type": "application/json"},
            b'{"errors":[{"code":"UNKNOWN","message":"disk on fire"}]}',
        )

    with FakeServer(app) as server, fake_client(server, retries=2) as client:
        with pytest.raises(RegistryError, match="HTTP 500: UNKNOWN: disk on fire"):
            client.get_manifest("r", "v1")
        assert len(server.paths("GET")) == 3


def test_upload_failing_mid_way_restarts_the_session_with_relative_locations():
    data = pseudo_random(9, 3000)
    state = {"sessions": 0, "put_failures": 1, "stored": None}

    def app(method, path, headers, body):
        if method == "HEAD":
            return 404, {}, b""
        if method == "POST":
            state["sessions"] += 1
            return 202, {"Location": f"/v2/r/blobs/uploads/s{state['sessions']}?_state=abc"}, b""
        if method == "PUT":
            if state["put_failures"]:
                state["put_failures"] -= 1
                return 502, {}, b"bad gateway"
            assert "_state=abc" in path and f"digest={sha(data).replace(':', '%3A')}" in path
            state["stored"] = body
            return 201, {"Docker-Content-Digest": sha(data), "Location": f"/v2/r/blobs/{sha(data)}"}, b""
        return 405, {}, b""

    with FakeServer(app) as server, fake_client(server) as client:
        assert client.put_blob("r", sha(data), data, len(data)) == "uploaded"
    assert state["sessions"] == 2 and state["stored"] == data
    assert server.paths("PUT")[-1].startswith("/v2/r/blobs/uploads/s2?")


# ---- Bearer tokens ------------------------------------------------------------------------------------
# docker-registry's own token auth needs a separate token service that signs JWTs with a key the
# registry trusts; Debian ships no such service. So the Bearer flow runs against a stand-in registry
# that demands tokens and a stand-in token service that issues them.


class TokenWorld:
    """A fake registry that wants `Bearer <token for scope>` and a token service on another port."""

    def __init__(self, users: dict[str, str] | None = None):
        self.users = users or {}
        self.token_requests: list[tuple[str | None, list[str]]] = []
        self.token = FakeServer(self._token_app)
        self.registry = FakeServer(self._registry_app)

    def __enter__(self):
        self.token.__enter__()
        self.registry.__enter__()
        return self

    def __exit__(self, *exc_info):
        self.registry.__exit__(*exc_info)
        self.token.__exit__(*exc_info)

    def _token_app(self, method, path, headers, body):
        from base64 import b64decode
        from urllib.parse import parse_qs, urlsplit

        query = parse_qs(urlsplit(path).query)
        user = None
        if headers.get("authorization", "").startswith("Basic "):
            user, _, password = b64decode(headers["authorization"][6:]).decode().partition(":")
            if self.users.get(user) != password:
                return 401, {}, b'{"details":"wrong password"}'
        scopes = query.get("scope", [])
        self.token_requests.append((user, scopes))
        assert query.get("service") == ["fake-registry"]
        token = f"{user or 'anonymous'}|{' '.join(scopes)}"
        return (
            200,
            {"Content-Type": "application/json"},
            json.dumps({"token": token, "expires_in": 300}).encode(),
        )

    def _registry_app(self, method, path, headers, body):
        repo = path.split("/")[2]
        wanted = f"repository:{repo}:pull"
        if (
            not headers.get("authorization", "").startswith("Bearer ")
            or wanted not in headers["authorization"]
        ):
            challenge = (
                f'Bearer realm="http://{self.token.host}/token",service="fake-registry",scope="{wanted}"'
            )
            return (
                401,
                {"WWW-Authenticate": challenge, "Content-Type": "application/json"},
                (b'{"errors":[{"code":"UNAUTHORIZED","message":"authentication required"}]}'),
            )
        return 200, {"Content-Type": OCI_MANIFEST}, GOOD_MANIFEST


def test_bearer_token_is_fetched_with_credentials_and_reused_per_scope(tmp_path):
    with TokenWorld(users={"bob": "pw"}) as world:
        authfile = write_authfile(tmp_path / "auth.json", world.registry.host, "bob", "pw")
        with fake_client(world.registry, authfile=str(authfile)) as client:
            for _ in range(3):
                assert client.get_manifest("team", "v1").body == GOOD_MANIFEST
            assert client.get_manifest("other", "v1").digest == sha(GOOD_MANIFEST)
    # One token per scope, fetched as bob; only the very first request went out without a token.
    assert world.token_requests == [("bob", ["repository:team:pull"]), ("bob", ["repository:other:pull"])]
    unauthenticated = [h for _, _, h in world.registry.requests if "authorization" not in h]
    assert len(unauthenticated) == 1


def test_bearer_anonymous_token_without_credentials():
    with TokenWorld() as world, fake_client(world.registry) as client:
        assert client.get_manifest("public", "v1").body == GOOD_MANIFEST
    assert world.token_requests == [(None, ["repository:public:pull"])]


def test_bearer_token_service_refusing_credentials_is_a_clear_error(tmp_path):
    with TokenWorld(users={"bob": "pw"}) as world:
        authfile = write_authfile(tmp_path / "auth.json", world.registry.host, "bob", "nope")
        with fake_client(world.registry, authfile=str(authfile)) as client:
            with pytest.raises(RegistryError) as info:
                client.get_manifest("team", "v1")
    message = str(info.value)
    assert message.startswith("unauthorized:") and "repository:team:pull" in message
    assert f"user 'bob' for {world.registry.host} from {authfile}" in message


def test_authfile_keys_with_scheme_and_path_are_understood(tmp_path):
    # docker login writes "https://HOST/v1/"-style keys for some registries; podman allows HOST/NAMESPACE.
    with TokenWorld(users={"bob": "pw", "carol": "pw2"}) as world:
        path = Path(tmp_path / "auth.json")
        write_authfile(path, f"https://{world.registry.host}/v1/", "bob", "pw")
        write_authfile(path, f"{world.registry.host}/special", "carol", "pw2")
        with fake_client(world.registry, authfile=str(path)) as client:
            client.get_manifest("team", "v1")
            client.get_manifest("special", "v1")
    assert [user for user, _ in world.token_requests] == ["bob", "carol"]
