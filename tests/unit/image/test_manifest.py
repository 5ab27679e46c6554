"""Manifests, indexes, platform choice, image configs and config.json."""

from __future__ import annotations

import contextlib
import json
import re
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.errors import ImageFormatError
from agent.image import manifest as m

D1 = "sha256:" + "1" * 64
D2 = "sha256:" + "2" * 64
D3 = "sha256:" + "3" * 64


def doc(obj: Any) -> bytes:
    return json.dumps(obj).encode()


def image_manifest(media_type: str | None = m.OCI_MANIFEST, **extra: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "schemaVersion": 2,
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": D1, "size": 10},
        "layers": [
            {"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": D2, "size": 5},
            {
                "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip+encrypted",
                "digest": D3,
                "size": 7,
                "annotations": {"org.opencontainers.image.enc.keys.provider.attestation-agent": "x"},
            },
        ],
        **extra,
    }
    if media_type is not None:
        body["mediaType"] = media_type
    return body


def index(*entries: tuple[str, str, str | None]) -> dict[str, Any]:
    manifests = []
    for i, (os_name, arch, variant) in enumerate(entries):
        platform = {"os": os_name, "architecture": arch} | ({"variant": variant} if variant else {})
        manifests.append({"mediaType": m.OCI_MANIFEST, "digest": f"sha256:{i:064x}", "size": 1, "platform": platform})
    return {"schemaVersion": 2, "mediaType": m.OCI_INDEX, "manifests": manifests}


class TestParseManifest:
    def test_oci_manifest(self) -> None:
        parsed = m.parse_manifest(doc(image_manifest()))
        assert isinstance(parsed, m.Manifest)
        assert parsed.config.digest == D1
        assert [layer.digest for layer in parsed.layers] == [D2, D3]
        assert parsed.layers[1].annotations == {"org.opencontainers.image.enc.keys.provider.attestation-agent": "x"}

    def test_docker_manifest_without_media_type_uses_header(self) -> None:
        parsed = m.parse_manifest(doc(image_manifest(None)), f"{m.DOCKER_MANIFEST}; charset=utf-8")
        assert isinstance(parsed, m.Manifest)
        assert parsed.media_type == m.DOCKER_MANIFEST

    def test_index_by_shape(self) -> None:
        body = index(("linux", "amd64", None))
        del body["mediaType"]
        assert isinstance(m.parse_manifest(doc(body)), m.Index)

    @pytest.mark.parametrize(
        ("body", "message"),
        [
            ({"schemaVersion": 1, "name": "x"}, "`schemaVersion` is 1, expected 2"),
            (image_manifest("application/vnd.docker.distribution.manifest.v1+prettyjws"), "manifest `mediaType` is"),
            (image_manifest(layers="x"), "manifest `layers` is a string, expected an array"),
            (image_manifest(layers=[{"mediaType": "a", "digest": "sha256:zz", "size": 1}]), "layer 0 `digest` is"),
            (image_manifest(layers=[{"mediaType": "a", "digest": D2, "size": -1}]), "layer 0 `size` is -1"),
            (image_manifest(layers=[{"mediaType": "a", "digest": D2, "size": True}]), "layer 0 `size` is True"),
            (image_manifest(layers=[{"mediaType": "a", "digest": D2, "size": 1}] * 257), "has 257 entries"),
            (image_manifest(config={"mediaType": "text/plain", "digest": D1, "size": 1}), "config `mediaType`"),
            (image_manifest(config={"mediaType": m.CONFIG_TYPES[0], "digest": D1, "size": 1 << 30}), "image config is"),
        ],
    )
    def test_hostile_or_wrong(self, body: dict[str, Any], message: str) -> None:
        with pytest.raises(ImageFormatError, match=re.escape(message)):
            m.parse_manifest(doc(body))

    def test_oversized(self) -> None:
        with pytest.raises(ImageFormatError, match=re.escape("manifest is 4194305 bytes, expected at most 4194304")):
            m.parse_manifest(b" " * (m.MAX_MANIFEST_BYTES + 1))

    def test_duplicate_keys_rejected(self) -> None:
        with pytest.raises(ImageFormatError, match="more than once"):
            m.parse_manifest(b'{"schemaVersion": 2, "schemaVersion": 2}')

    @given(st.binary(max_size=512))
    def test_random_bytes_parse_or_raise(self, data: bytes) -> None:
        with contextlib.suppress(ImageFormatError):
            m.parse_manifest(data)


class TestSelectPlatform:
    def test_first_os_arch_match(self) -> None:
        idx = m.parse_manifest(doc(index(("linux", "arm64", "v8"), ("linux", "amd64", None), ("linux", "amd64", "v3"))))
        assert isinstance(idx, m.Index)
        assert m.select_platform(idx, m.platform_for_machine("x86_64")).digest == f"sha256:{1:064x}"

    def test_variant_preferred(self) -> None:
        idx = m.parse_manifest(doc(index(("linux", "arm", "v6"), ("linux", "arm64", None), ("linux", "arm64", "v8"))))
        assert isinstance(idx, m.Index)
        assert m.select_platform(idx, m.platform_for_machine("aarch64")).digest == f"sha256:{2:064x}"
        assert m.select_platform(idx, m.Platform(os="linux", architecture="arm64")).digest == f"sha256:{1:064x}"

    def test_no_match(self) -> None:
        idx = m.parse_manifest(doc(index(("windows", "amd64", None), ("unknown", "unknown", None))))
        assert isinstance(idx, m.Index)
        with pytest.raises(ImageFormatError, match="no entry found in image index manifest matching client's default"):
            m.select_platform(idx, m.platform_for_machine("x86_64"))

    def test_machine_names(self) -> None:
        assert m.platform_for_machine("aarch64") == m.Platform(os="linux", architecture="arm64", variant="v8")
        assert m.platform_for_machine("ppc64le").architecture == "ppc64le"


class TestImageConfig:
    CONFIG: dict[str, Any] = {  # noqa: RUF012 - read-only fixture
        "os": "linux",
        "architecture": "amd64",
        "created": "2024-01-01T00:00:00Z",
        "config": {
            "Env": ["PATH=/bin", "A=1"],
            "Entrypoint": ["/bin/app"],
            "Cmd": ["--flag"],
            "WorkingDir": "/srv",
            "Volumes": {"/data": {}},
            "Labels": {"org.opencontainers.image.os": "label-wins", "x": "y"},
            "StopSignal": "SIGTERM",
            "ExposedPorts": {"80/tcp": {}, "443/tcp": {}},
            "User": "1000",
        },
        "rootfs": {"type": "layers", "diff_ids": [D2, D3]},
    }

    def test_parse(self) -> None:
        config = m.parse_image_config(doc(self.CONFIG))
        assert config.diff_ids == (D2, D3)
        assert (config.os, config.architecture) == ("linux", "amd64")

    def test_runtime_spec(self) -> None:
        spec = json.loads(m.runtime_spec(m.parse_image_config(doc(self.CONFIG))))
        assert spec["hostname"] == "image-rs"
        assert spec["root"]["path"] == "rootfs"
        assert spec["process"]["args"] == ["/bin/app", "--flag"]
        assert spec["process"]["env"] == ["PATH=/bin", "A=1"]
        assert spec["process"]["cwd"] == "/srv"
        assert spec["process"]["user"] == {"uid": 0, "gid": 0}  # User is not converted, as the reference
        assert spec["mounts"][0] == {
            "destination": "/data",
            "type": "tmpfs",
            "options": ["nosuid", "noexec", "nodev", "relatime", "rw"],
        }
        annotations = spec["annotations"]
        assert annotations["org.opencontainers.image.os"] == "label-wins"
        assert annotations["org.opencontainers.image.architecture"] == "amd64"
        assert annotations["org.opencontainers.image.created"] == "2024-01-01T00:00:00Z"
        assert annotations["org.opencontainers.image.stopSignal"] == "SIGTERM"
        assert annotations["org.opencontainers.image.exposedPorts"] == "443/tcp,80/tcp"
        assert annotations["x"] == "y"

    def test_bad_diff_ids(self) -> None:
        bad = {**self.CONFIG, "rootfs": {"diff_ids": ["sha1:abc"]}}
        with pytest.raises(
            ImageFormatError, match=re.escape("image config diff_id 0 algorithm is 'sha1', expected one of: sha256")
        ):
            m.parse_image_config(doc(bad))


class TestDigest:
    def test_verify(self) -> None:
        m.verify_digest(b"abc", "sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad", what="x")
        with pytest.raises(ImageFormatError, match=re.escape("x digest is sha256:ba78")):
            m.verify_digest(b"abc", D1, what="x")
