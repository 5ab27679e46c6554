"""The ctypes mirrors in agent.tee._uapi against the C compiler's view of the kernel headers.

The oracle is ``tests/vectors/hw/abi_ground_truth.txt`` (sizeof/offsetof/ioctl numbers printed by a C program
built against linux-libc-dev); it is parsed here, so every value it lists is checked.
"""

from __future__ import annotations

import ctypes
import re
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from agent.tee import _uapi as uapi

MIRRORS: dict[str, type[ctypes.Structure]] = {
    "snp_report_req": uapi.SnpReportReq,
    "snp_report_resp": uapi.SnpReportResp,
    "snp_derived_key_req": uapi.SnpDerivedKeyReq,
    "snp_derived_key_resp": uapi.SnpDerivedKeyResp,
    "snp_guest_request_ioctl": uapi.SnpGuestRequestIoctl,
    "snp_ext_report_req": uapi.SnpExtReportReq,
    "tdx_report_req": uapi.TdxReportReq,
}
# Structs of non-mainline TDX ioctls (hw-abi.md §1.2): listed in the file, deliberately not mirrored.
DOWNSTREAM_ONLY = {"tdx_verify_report_req", "tdx_extend_rtmr_req", "tdx_quote_req", "tdx_quote_hdr"}
IOCTLS = {
    "SNP_GET_REPORT": uapi.SNP_GET_REPORT,
    "SNP_GET_DERIVED_KEY": uapi.SNP_GET_DERIVED_KEY,
    "SNP_GET_EXT_REPORT": uapi.SNP_GET_EXT_REPORT,
    "TDX_CMD_GET_REPORT0": uapi.TDX_CMD_GET_REPORT0,
}
DIRECTIONS = {"IOWR": uapi.IOC_READ | uapi.IOC_WRITE, "IOR": uapi.IOC_READ, "IOW": uapi.IOC_WRITE}

_SIZEOF = re.compile(r"sizeof\(struct (\w+)\)=(\d+)")
_INLINE_OFFSET = re.compile(r"offsetof\((\w+)\)=(\d+)")
_PAIR = re.compile(r"(\w+)=(\d+)")
_NAMED_IOCTL = re.compile(r"^(\w+)\s*=.*?(0x[0-9a-f]+) \((\d+)\)\s*$")
_ENCODED = re.compile(r"_(IOWR|IOR|IOW)\('(.)',(\d+)(?:,(\d+))?\)(?: \[[^\]]*\])?\s*=\s*(0x[0-9a-f]+)")


@dataclass
class GroundTruth:
    sizes: dict[str, int] = field(default_factory=dict)
    offsets: dict[str, dict[str, int]] = field(default_factory=dict)
    ioctls: dict[str, tuple[int, int]] = field(default_factory=dict)  # name -> (hex value, decimal value)
    encodings: list[tuple[str, str, int, int, int]] = field(default_factory=list)  # dir, type, nr, size, value


def parse_ground_truth(text: str) -> GroundTruth:
    truth = GroundTruth()
    last_struct = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        structs = _SIZEOF.findall(line)
        if structs:
            last_struct = structs[0][0]
            for name, size in structs:
                truth.sizes[name] = int(size)
            for member, offset in _INLINE_OFFSET.findall(line):
                truth.offsets.setdefault(last_struct, {})[member] = int(offset)
            continue
        if line.startswith("offsetof "):
            truth.offsets.setdefault(last_struct, {}).update(
                (member, int(offset)) for member, offset in _PAIR.findall(line)
            )
            continue
        named = _NAMED_IOCTL.match(line)
        if named:
            truth.ioctls[named[1]] = (int(named[2], 16), int(named[3]))
        for direction, ioc_type, nr, size, value in _ENCODED.findall(line):
            struct_size = int(size) if size else truth.sizes[last_struct]
            truth.encodings.append((direction, ioc_type, int(nr), struct_size, int(value, 16)))
    return truth


@pytest.fixture(scope="module")
def truth(vectors: Path) -> GroundTruth:
    return parse_ground_truth((vectors / "hw" / "abi_ground_truth.txt").read_text())


class TestGroundTruthFile:
    def test_parser_found_everything(self, truth: GroundTruth) -> None:
        assert set(truth.sizes) == set(MIRRORS) | DOWNSTREAM_ONLY
        assert set(truth.ioctls) == set(IOCTLS)
        assert len(truth.encodings) == 9  # GET_REPORT0 plus the eight downstream encodings
        assert set(truth.offsets) >= {"snp_report_req", "snp_guest_request_ioctl", "tdx_report_req"}

    def test_hex_and_decimal_agree(self, truth: GroundTruth) -> None:
        for name, (hex_value, dec_value) in truth.ioctls.items():
            assert hex_value == dec_value, name


class TestStructMirrors:
    @pytest.mark.parametrize("name", sorted(MIRRORS))
    def test_size(self, truth: GroundTruth, name: str) -> None:
        assert ctypes.sizeof(MIRRORS[name]) == truth.sizes[name]

    @pytest.mark.parametrize("name", sorted(MIRRORS))
    def test_offsets(self, truth: GroundTruth, name: str) -> None:
        struct_type = MIRRORS[name]
        for member, offset in truth.offsets.get(name, {}).items():
            assert uapi.offsetof(struct_type, member) == offset, f"{name}.{member}"

    @pytest.mark.parametrize("name", sorted(n for n in MIRRORS if n != "snp_report_resp"))
    def test_mirror_has_no_undocumented_members(self, truth: GroundTruth, name: str) -> None:
        listed = set(truth.offsets.get(name, {})) | {"user_data", "data", "reportdata"}
        declared = {field_name for field_name, *_ in MIRRORS[name]._fields_ if not field_name.startswith("_")}
        assert declared <= listed

    def test_exitinfo2_union(self) -> None:
        ioc = uapi.SnpGuestRequestIoctl(exitinfo2=(uapi.SNP_GUEST_VMM_ERR_BUSY << 32) | uapi.SEV_RET_INVALID_PARAM)
        assert (ioc.fw_error, ioc.vmm_error) == (0x16, 2)
        ioc.vmm_error = uapi.SNP_GUEST_VMM_ERR_INVALID_LEN
        assert ioc.exitinfo2 == 1 << uapi.SNP_GUEST_VMM_ERR_SHIFT | 0x16
        assert ioc.exitinfo2 & uapi.SNP_GUEST_FW_ERR_MASK == ioc.fw_error

    def test_response_payload_layouts(self) -> None:
        assert ctypes.sizeof(uapi.SnpMsgReportRspHdr) == 0x20
        assert uapi.offsetof(uapi.SnpMsgReportRspHdr, "report_size") == 4
        assert ctypes.sizeof(uapi.SnpMsgKeyRsp) == uapi.SNP_DERIVED_KEY_RESP_SIZE
        assert uapi.offsetof(uapi.SnpMsgKeyRsp, "key") == 0x20
        assert 0x20 + uapi.SNP_REPORT_SIZE <= uapi.SNP_REPORT_RESP_SIZE


class TestIoctlNumbers:
    @pytest.mark.parametrize("name", sorted(IOCTLS))
    def test_mainline_numbers(self, truth: GroundTruth, name: str) -> None:
        assert IOCTLS[name] == truth.ioctls[name][0]

    def test_every_listed_encoding(self, truth: GroundTruth) -> None:
        for direction, ioc_type, nr, size, value in truth.encodings:
            got = uapi.ioc(DIRECTIONS[direction], ioc_type, nr, size)
            assert got == value, f"_{direction}({ioc_type!r}, {nr}, {size})"

    def test_iowr_takes_the_size_from_the_mirror(self) -> None:
        assert uapi.iowr("T", 1, uapi.TdxReportReq) == uapi.ioc(3, "T", 1, 1088) == 0xC4405401

    @pytest.mark.parametrize(
        ("args", "message"),
        [
            ((4, "S", 0, 32), "`direction` is 4, expected 0..3"),
            ((3, "SS", 0, 32), "ord() expected a character, but string of length 2 found"),
            ((3, "\u0100", 0, 32), "`ioc_type` is 'Ā', expected a single byte"),
            ((3, "S", 256, 32), "`nr` is 256, expected 0..255"),
            ((3, "S", 0, 1 << 14), "`size` is 0x4000, expected below 0x4000"),
        ],
    )
    def test_ioc_rejects_out_of_range_fields(self, args: tuple[int, str, int, int], message: str) -> None:
        with pytest.raises((ValueError, TypeError), match=re.escape(message)):
            uapi.ioc(*args)


class TestStatusTables:
    def test_names_from_the_headers(self) -> None:
        assert uapi.SEV_RET_NAMES[uapi.SEV_RET_INVALID_PARAM] == "INVALID_PARAM"
        assert uapi.SEV_RET_NAMES[uapi.SEV_RET_INVALID_KEY] == "INVALID_KEY"
        assert uapi.SNP_VMM_ERR_NAMES == {1: "INVALID_LEN", 2: "BUSY", 0xFFFFFFFF: "GENERIC"}

    def test_limits(self) -> None:
        assert uapi.SEV_FW_BLOB_MAX_SIZE == 4 * uapi.PAGE_SIZE
        assert uapi.SNP_MSG_VERSION == 1
