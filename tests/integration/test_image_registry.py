"""The registry client against a real CNCF distribution registry on loopback: auth flows, digests, retries."""

from __future__ import annotations

import re
import ssl
from collections.abc import Generator, Iterator
from pathlib import Path

import httpx
import pytest

from agent.errors import ImageFormatError, RegistryError
from agent.image.auth import Credentials
from agent.image.manifest import Descriptor, Manifest, parse_manifest
from agent.image.reference import parse_reference
from agent.image.registries import PullTask
from agent.image.registry import Deadline, RegistryClient
from tests.fakes.registry import (
    Entry,
    FlakyProxy,
    Image,
    Pusher,
    Registry,
    TokenIssuer,
    TokenServer,
    bcrypt_hash,
    build_image,
    gzip_layer,
    sha256,
    tar_layer,
)
from tests.integration.conftest import TlsFiles
from tests.integration.image_support import image_test_marks

pytestmark = image_test_marks(overlay=False)

USER, PASSWORD = "puller", "pull-secret-42"


def sample_image(seed: bytes = b"x", size: int = 300_000) -> Image:
    big = (seed * (size // len(seed) + 1))[:size]
    return build_image(
        [
            gzip_layer(tar_layer([Entry("etc/", kind="dir"), Entry("etc/hello", b"hello " + seed)])),
            gzip_layer(tar_layer([Entry("data.bin", big)])),
        ]
    )


@pytest.fixture(scope="module")
def plain(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Registry, Image]]:
    with Registry(tmp_path_factory.mktemp("plain")) as registry:
        pusher = Pusher(registry.url)
        image = sample_image()
        pusher.image("app/one", "v1", image)
        pusher.close()
        yield registry, image


def task(host: str, repo: str, ref: str = "v1", *, insecure: bool = True) -> PullTask:
    sep = "@" if ":" in ref else ":"
    return PullTask(reference=parse_reference(f"{host}/{repo}{sep}{ref}"), insecure=insecure)


async def fetch_all(
    client: RegistryClient, t: PullTask, tmp: Path, creds: Credentials | None = None, deadline_s: float = 30
) -> Manifest:
    session = client.session(t, creds, Deadline(deadline_s))
    body, content_type, _digest = await session.get_manifest(t.reference.manifest_reference)
    manifest = parse_manifest(body, content_type)
    assert isinstance(manifest, Manifest)
    await session.get_blob(manifest.config, limit=1 << 20)
    for i, layer in enumerate(manifest.layers):
        await session.download_blob(layer, tmp / f"layer{i}")
        assert sha256((tmp / f"layer{i}").read_bytes()) == layer.digest
        assert (tmp / f"layer{i}").stat().st_mode & 0o777 == 0o600
    return manifest


class TestPlainRegistry:
    async def test_tag_and_digest(self, plain: tuple[Registry, Image], tmp_path: Path) -> None:
        registry, image = plain
        client = RegistryClient()
        try:
            await fetch_all(client, task(registry.host, "app/one"), tmp_path)
            session = client.session(task(registry.host, "app/one", image.digest), None, Deadline(30))
            _, _, digest = await session.get_manifest(image.digest)
            assert digest == image.digest
        finally:
            await client.aclose()

    async def test_https_without_insecure_fails(self, plain: tuple[Registry, Image]) -> None:
        registry, _ = plain
        client = RegistryClient()
        try:
            session = client.session(task(registry.host, "app/one", insecure=False), None, Deadline(1.5))
            with pytest.raises(RegistryError, match="deadline"):
                await session.get_manifest("v1")
        finally:
            await client.aclose()

    async def test_unknown_tag(self, plain: tuple[Registry, Image]) -> None:
        registry, _ = plain
        client = RegistryClient()
        try:
            session = client.session(task(registry.host, "app/one"), None, Deadline(30))
            with pytest.raises(RegistryError, match=re.escape("manifest 127.0.0.1")) as info:
                await session.get_manifest("nope")
            assert info.value.status == 404
            assert "MANIFEST_UNKNOWN" in str(info.value)
        finally:
            await client.aclose()


class TestAuth:
    async def test_htpasswd_basic(self, tmp_path: Path) -> None:
        htpasswd = tmp_path / "htpasswd"
        htpasswd.write_text(f"{USER}:{bcrypt_hash(PASSWORD)}\n")
        with Registry(tmp_path / "r", auth={"htpasswd": {"realm": "basic-realm", "path": str(htpasswd)}}) as registry:
            pusher = Pusher(registry.url, auth=httpx.BasicAuth(USER, PASSWORD))
            pusher.image("private/app", "v1", sample_image(b"b"))
            pusher.close()
            client = RegistryClient()
            try:
                await fetch_all(client, task(registry.host, "private/app"), tmp_path, Credentials(USER, PASSWORD))
                session = client.session(task(registry.host, "private/app"), None, Deadline(30))
                with pytest.raises(RegistryError) as info:
                    await session.get_manifest("v1")
                assert info.value.status == 401
                wrong = client.session(task(registry.host, "private/app"), Credentials(USER, "nope"), Deadline(30))
                with pytest.raises(RegistryError) as info:
                    await wrong.get_manifest("v1")
                assert info.value.status == 401
            finally:
                await client.aclose()

    async def test_bearer_token(self, tmp_path: Path) -> None:
        issuer = TokenIssuer.create()
        bundle = tmp_path / "token-ca.pem"
        bundle.write_bytes(issuer.cert_pem)
        with TokenServer(issuer, {USER: PASSWORD, "pusher": "push"}) as tokens:
            auth = {
                "token": {
                    "realm": tokens.url,
                    "service": issuer.service,
                    "issuer": issuer.issuer,
                    "rootcertbundle": str(bundle),
                }
            }
            with Registry(tmp_path / "r", auth=auth) as registry:
                image = sample_image(b"t")
                pusher = Pusher(registry.url, auth=_TokenAuth(issuer, "token/app"))
                pusher.image("token/app", "v1", image)
                pusher.close()
                tokens.requests.clear()
                client = RegistryClient()
                try:
                    await fetch_all(client, task(registry.host, "token/app"), tmp_path, Credentials(USER, PASSWORD))
                    # one token for the whole session: the probe's challenge, then the cached token
                    assert len(tokens.requests) == 1
                    request = tokens.requests[0]
                    assert request["user"] == USER
                    assert request["query"]["scope"] == ["repository:token/app:pull"]
                    assert request["query"]["service"] == [issuer.service]
                    anonymous = client.session(task(registry.host, "token/app"), None, Deadline(30))
                    with pytest.raises(RegistryError) as info:
                        await anonymous.get_manifest("v1")
                    assert info.value.status == 401
                finally:
                    await client.aclose()


class _TokenAuth(httpx.Auth):
    def __init__(self, issuer: TokenIssuer, repo: str) -> None:
        self.header = f"Bearer {issuer.token('pusher', repo, ['pull', 'push'])}"

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        request.headers["Authorization"] = self.header
        yield request


class TestFlaky:
    @pytest.fixture
    def proxy(self, plain: tuple[Registry, Image]) -> Iterator[FlakyProxy]:
        with FlakyProxy(plain[0].port) as proxy:
            yield proxy

    @pytest.mark.parametrize("faults", [["reset"], ["503", "500"], ["truncate"], ["reset", "truncate", "503"]])
    async def test_transient_faults_are_retried(
        self, plain: tuple[Registry, Image], proxy: FlakyProxy, tmp_path: Path, faults: list[str]
    ) -> None:
        proxy.faults = {"/blobs/sha256": list(faults), "/manifests/": ["503"]}
        client = RegistryClient()
        try:
            await fetch_all(client, task(proxy.host, "app/one"), tmp_path)
        finally:
            await client.aclose()
        assert [f for _, f in proxy.seen if f != "pass"] == ["503", *faults]

    async def test_wrong_blob_digest_is_not_retried(
        self, plain: tuple[Registry, Image], proxy: FlakyProxy, tmp_path: Path
    ) -> None:
        _, image = plain
        layer = image.layers[1]
        proxy.faults = {f"/blobs/{layer['digest']}": ["corrupt", "corrupt"]}
        client = RegistryClient()
        try:
            session = client.session(task(proxy.host, "app/one"), None, Deadline(30))
            descriptor = Descriptor(media_type=layer["mediaType"], digest=layer["digest"], size=layer["size"])
            with pytest.raises(ImageFormatError, match=re.escape(f"expected {layer['digest']}")):
                await session.download_blob(descriptor, tmp_path / "blob")
            assert not (tmp_path / "blob").exists()
            assert [f for _, f in proxy.seen if f != "pass"] == ["corrupt"]
        finally:
            await client.aclose()

    async def test_wrong_manifest_digest(self, plain: tuple[Registry, Image], proxy: FlakyProxy) -> None:
        _, image = plain
        proxy.faults = {"/manifests/": ["corrupt"]}
        client = RegistryClient()
        try:
            session = client.session(task(proxy.host, "app/one", image.digest), None, Deadline(30))
            with pytest.raises(ImageFormatError, match=re.escape(f"expected {image.digest}")):
                await session.get_manifest(image.digest)
        finally:
            await client.aclose()

    async def test_deadline_bounds_a_stalled_registry(self, plain: tuple[Registry, Image], proxy: FlakyProxy) -> None:
        proxy.faults = {"/manifests/": ["stall"]}
        client = RegistryClient()
        try:
            session = client.session(task(proxy.host, "app/one"), None, Deadline(1.0))
            with pytest.raises(RegistryError, match="deadline"):
                await session.get_manifest("v1")
        finally:
            await client.aclose()

    async def test_oversized_blob(self, plain: tuple[Registry, Image], proxy: FlakyProxy, tmp_path: Path) -> None:
        _, image = plain
        layer = image.layers[1]
        client = RegistryClient()
        try:
            session = client.session(task(proxy.host, "app/one"), None, Deadline(30))
            lying = Descriptor(media_type=layer["mediaType"], digest=layer["digest"], size=layer["size"] - 1)
            with pytest.raises(ImageFormatError, match="is larger than its descriptor size"):
                await session.download_blob(lying, tmp_path / "blob")
            assert not (tmp_path / "blob").exists()
        finally:
            await client.aclose()


class TestTls:
    async def test_extra_root_certificates(self, tls_files: TlsFiles, tmp_path: Path) -> None:
        with Registry(tmp_path / "r", tls=(tls_files.cert, tls_files.key)) as registry:
            pusher = Pusher(registry.url, verify=ssl.create_default_context(cafile=str(tls_files.ca)))
            pusher.image("tls/app", "v1", sample_image(b"s"))
            pusher.close()
            client = RegistryClient(extra_roots=[tls_files.ca.read_text()])
            try:
                await fetch_all(client, task(registry.host, "tls/app", insecure=False), tmp_path)
            finally:
                await client.aclose()
            untrusting = RegistryClient()
            try:
                session = untrusting.session(task(registry.host, "tls/app", insecure=False), None, Deadline(1.0))
                with pytest.raises(RegistryError):
                    await session.get_manifest("v1")
            finally:
                await untrusting.aclose()
