"""Runtime measurement end to end on emulated TDX: extends through the FUSE measurement sysfs, quotes that carry
the RTMRs, `cc_eventlog` replayed by the dev KBS, `kill -9` during hundreds of extends, concurrent callers, the
ttRPC drop-in, REST `POST /aa/aael`, and the `measure` / `eventlog` commands.

Expected register values and entry bytes are computed here from the format (guest-api.md §7.1), not with the
agent's code.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import random
import struct
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from cvm_tools.devkbs.server import DevKbsServer

from agent.api._gen import attestation_agent_pb2 as aa
from agent.client import call
from agent.tee import ccel, tdx
from tests.fakes.tsmfs import MountedTsm, TsmFsOptions, mounted_tsm
from tests.integration.hw_fixtures import HwDaemon, cli
from tests.paths import VECTORS_DIR as VECTORS

pytestmark = pytest.mark.integration

GCP = VECTORS / "hw" / "tdx" / "ccel_gcp_cos113"
CCEL = GCP / "ccel_data.bin"
EXTEND = "/attestation_agent.AttestationAgentService/ExtendRuntimeMeasurement"
EVIDENCE = "/attestation_agent.AttestationAgentService/GetEvidence"
PCR_TO_RTMR = {17: 3, 1: 0, 7: 0, 3: 1, 8: 2, 0: 3}


def tagged(text: str) -> bytes:
    raw = text.encode()
    return struct.pack("<II", 0x4141454C, len(raw)) + raw


def entry_bytes(rtmr: int, text: str) -> bytes:
    data = tagged(text)
    return (
        struct.pack("<IIIH", rtmr + 1, 6, 1, 0x000C)
        + hashlib.sha384(data).digest()
        + struct.pack("<I", len(data))
        + data
    )


def extend_value(register: bytes, text: str) -> bytes:
    return hashlib.sha384(register + hashlib.sha384(tagged(text)).digest()).digest()


def extend(socket: str, domain: str, operation: str, content: str, index: int | None = None) -> int:
    request = aa.ExtendRuntimeMeasurementRequest(Domain=domain, Operation=operation, Content=content)
    if index is not None:
        request.RegisterIndex = index
    reply = call(socket, EXTEND, request, aa.ExtendRuntimeMeasurementResponse, timeout_s=30)
    result: int = reply.Result
    return result


@dataclass
class Platform:
    """Emulated TDX: configfs-tsm and the measurement sysfs in one FUSE mount, the GCP CCEL, an agent config."""

    tmp: Path
    mount: MountedTsm
    log: Path
    config: Path

    def flags(self) -> list[str]:
        absent = self.tmp / "absent"
        return [
            "--tee",
            "tdx",
            "--config",
            str(self.config),
            "--tsm-report-dir",
            str(self.mount.root),
            "--tdx-measurements-dir",
            str(self.mount.measurements),
            "--ccel-data",
            str(CCEL),
            "--tdx-guest-device",
            str(absent / "tdx_guest"),
            "--sev-guest-device",
            str(absent / "sev-guest"),
            "--sev-guest-platform-dir",
            str(absent / "sev-platform"),
        ]

    def daemon(self, name: str, *extra: str) -> HwDaemon:
        folder = self.tmp / name
        folder.mkdir()
        daemon = HwDaemon(folder, *self.flags(), *extra)
        daemon.wait_ready()
        return daemon

    def logged_texts(self) -> list[str]:
        """The agent's log parsed by hand: (MR index, text) of every entry, checking each digest."""
        data, texts, at = self.log.read_bytes(), [], 0
        while at < len(data):
            _mr, kind, count, alg = struct.unpack_from("<IIIH", data, at)
            assert (kind, count, alg) == (6, 1, 0x000C)
            digest = data[at + 14 : at + 62]
            (size,) = struct.unpack_from("<I", data, at + 62)
            event = data[at + 66 : at + 66 + size]
            assert len(event) == size, "torn entry"
            assert hashlib.sha384(event).digest() == digest
            texts.append(event[8:].decode())
            at += 66 + size
        return texts


@pytest.fixture
def platform(tmp_path: Path) -> Iterator[Platform]:
    options = TsmFsOptions(measurements=True, tdx_template=str(GCP / "quote_v4_padded8000.dat"))
    log = tmp_path / "run" / "attestation-agent" / "eventlog"
    config = tmp_path / "agent.toml"
    config.write_text(f'[eventlog]\nenabled = true\npath = "{log}"\n')
    with mounted_tsm(options, workdir=tmp_path) as mount:
        yield Platform(tmp_path, mount, log, config)


def quote_and_eventlog(socket: str) -> tuple[tdx.TdxQuote, bytes]:
    reply = call(socket, EVIDENCE, aa.GetEvidenceRequest(RuntimeData=os.urandom(32)), aa.GetEvidenceResponse)
    evidence = json.loads(reply.Evidence)
    return tdx.parse_quote(base64.b64decode(evidence["quote"])), base64.b64decode(evidence["cc_eventlog"])


def test_extends_reach_registers_quote_and_cc_eventlog(platform: Platform) -> None:
    initial = platform.mount.rtmrs()
    assert initial[3] == bytes(48)
    events: list[tuple[str, str, str, int | None]] = [("coco.com", "op", f"content {i}", None) for i in range(3)]
    events += [("d", "o", "index one", 1), ("d", "o", "index eight", 8), ("d", "o", "index seventeen", 17)]
    daemon = platform.daemon("agent")
    try:
        for domain, operation, content, index in events:
            assert extend(daemon.socket, domain, operation, content, index) == aa.OK
        quote, cc_eventlog = quote_and_eventlog(daemon.socket)
    finally:
        assert daemon.stop() == 0
    expected = list(initial)
    entries = b""
    for domain, operation, content, index in events:
        rtmr = PCR_TO_RTMR[17 if index is None else index]
        expected[rtmr] = extend_value(expected[rtmr], f"{domain} {operation} {content}")
        entries += entry_bytes(rtmr, f"{domain} {operation} {content}")
    assert platform.mount.rtmrs() == expected  # the register writes, compared with digests computed here
    assert platform.mount.state()["stats"]["extends"] == len(events)
    assert list(quote.body.rtmrs) == expected  # the quote carries them
    assert platform.log.read_bytes() == entries
    assert oct(platform.log.stat().st_mode & 0o777) == "0o600"
    trimmed = ccel.trim_ccel(CCEL.read_bytes())
    assert cc_eventlog == trimmed + entries + b"\xff" * 8
    assert ccel.replay_rtmrs(ccel.parse_event_log(cc_eventlog)) == quote.body.rtmrs


def test_dev_kbs_replays_cc_eventlog_and_rejects_a_mismatch(platform: Platform, dev_kbs: DevKbsServer) -> None:
    daemon = platform.daemon("agent", "--kbs-url", dev_kbs.url)
    token = ["token", "--socket", daemon.socket]
    try:
        for i in range(3):
            assert extend(daemon.socket, "github.com/confidential-containers", "PullImage", f'{{"image":"i{i}"}}') == 0
        accepted = cli(*token)
        assert accepted.returncode == 0, accepted.stderr
        # RTMR3 extended behind the agent's back: the log no longer replays to the quote
        fd = os.open(platform.mount.measurements / "rtmr3:sha384", os.O_WRONLY)
        os.pwrite(fd, b"\x42" * 48, 0)
        os.close(fd)
        rejected = cli(*token)
    finally:
        daemon.stop()
    assert rejected.returncode == 1
    assert "PERMISSION_DENIED" in rejected.stderr.decode()
    assert dev_kbs.core.counters["attest"] >= 1


def test_concurrent_callers(platform: Platform) -> None:
    daemon = platform.daemon("agent")
    errors: list[BaseException] = []

    def caller(n: int) -> None:
        try:
            for i in range(15):
                assert extend(daemon.socket, f"caller{n}", "op", f"{i}", [17, 1, 8][n % 3]) == aa.OK
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=caller, args=(n,)) for n in range(6)]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        quote, cc_eventlog = quote_and_eventlog(daemon.socket)
    finally:
        assert daemon.stop() == 0
    assert errors == []
    texts = platform.logged_texts()
    assert sorted(texts) == sorted(f"caller{n} op {i}" for n in range(6) for i in range(15))
    assert ccel.replay_rtmrs(ccel.parse_event_log(cc_eventlog)) == quote.body.rtmrs
    assert list(quote.body.rtmrs) == platform.mount.rtmrs()


def test_kill_9_at_random_points(platform: Platform) -> None:
    """Hundreds of extends from 4 callers; each RTMR write takes 10 ms (the agent is almost always inside an
    extend), and the agent is SIGKILLed at random instants (after 5-40 acknowledged extends) and restarted. After
    every restart: every acknowledged event is logged, nothing twice, and the register holds exactly the logged
    extends."""
    platform.mount.configure(extend_delay_s=0.01)
    rng = random.Random(int.from_bytes(os.urandom(4), "big"))
    acknowledged: set[str] = set()
    lock = threading.Lock()
    counter = iter(range(1_000_000))
    target, kills = 300, 0

    def check(logged: list[str]) -> None:
        assert acknowledged <= set(logged)  # no lost entry
        assert len(logged) == len(set(logged))  # nothing logged twice
        expected = bytes(48)
        for text in logged:
            expected = extend_value(expected, text)
        assert platform.mount.rtmrs()[3] == expected  # no extend without its entry, none twice
        assert platform.mount.state()["stats"]["extends"] == len(logged)

    def caller(socket: str) -> None:
        """One connection, failing fast (no wait for a restart) once the agent is gone."""
        with grpc.insecure_channel(f"unix:{socket}") as channel:
            stub = channel.unary_unary(
                EXTEND,
                request_serializer=aa.ExtendRuntimeMeasurementRequest.SerializeToString,
                response_deserializer=aa.ExtendRuntimeMeasurementResponse.FromString,
            )
            while len(acknowledged) < target:
                text = f"event {next(counter)}"
                request = aa.ExtendRuntimeMeasurementRequest(Domain="kill", Operation="test", Content=text)
                try:
                    reply = stub(request, timeout=30)
                except grpc.RpcError:
                    return
                assert reply.Result == aa.OK
                with lock:
                    acknowledged.add(f"kill test {text}")

    while len(acknowledged) < target:
        daemon = platform.daemon(f"run{kills}")
        check(platform.logged_texts())  # what recovery left
        threads = [threading.Thread(target=caller, args=(daemon.socket,)) for _ in range(4)]
        for thread in threads:
            thread.start()
        # kill after a random number of acknowledged extends, at a random instant within the next ones
        goal = min(target, len(acknowledged) + rng.randint(5, 40))
        while len(acknowledged) < goal and any(t.is_alive() for t in threads):
            time.sleep(0.002)
        time.sleep(rng.uniform(0, 0.03))
        daemon.process.kill()
        for thread in threads:
            thread.join()
        daemon.stop()
        kills += 1
    final = platform.daemon("final")
    try:
        logged = platform.logged_texts()
        check(logged)
        quote, cc_eventlog = quote_and_eventlog(final.socket)
    finally:
        assert final.stop() == 0
    assert len(logged) >= target
    assert len(set(logged) - acknowledged) <= kills  # at most the one in flight per kill, completed at restart
    assert ccel.replay_rtmrs(ccel.parse_event_log(cc_eventlog)) == quote.body.rtmrs
    outcomes = [
        json.loads(line).get("pending")
        for path in platform.tmp.glob("*/daemon.log")
        for line in path.read_text().splitlines()
        if '"measurement.ready"' in line
    ]
    assert kills >= 3
    assert {"completed", "discarded"} & set(outcomes), outcomes  # kills did land inside extends


def test_refuses_to_start_when_log_and_register_disagree(platform: Platform) -> None:
    daemon = platform.daemon("agent")
    try:
        assert extend(daemon.socket, "d", "o", "c") == aa.OK
    finally:
        assert daemon.stop() == 0
    fd = os.open(platform.mount.measurements / "rtmr3:sha384", os.O_WRONLY)
    os.pwrite(fd, b"\x42" * 48, 0)
    os.close(fd)
    folder = platform.tmp / "refused"
    folder.mkdir()
    refused = HwDaemon(folder, *platform.flags())
    code = refused.process.wait(timeout=30)
    refused.stop()
    assert code == 1
    assert "does not replay to the registers: entry 44 (agent, 'd o c')" in refused.log
    assert "no prefix of its 1 log entries replays to" in refused.log


def test_measure_and_eventlog_commands(platform: Platform) -> None:
    daemon = platform.daemon("agent")
    local = ["--eventlog-path", str(platform.log), "--ccel-data", str(CCEL)]
    sysfs = ["--tdx-measurements-dir", str(platform.mount.measurements)]
    try:
        measured = cli("measure", "--socket", daemon.socket, "example.com", "Deploy", "a b c")
        assert (measured.returncode, measured.stdout) == (0, b"OK\n"), measured.stderr
        assert cli("measure", "--socket", daemon.socket, "d", "o", "c", "--register-index", "1").returncode == 0
        bad = cli("measure", "--socket", daemon.socket, "d", "o", "c", "--register-index", "24")
        assert bad.returncode == 1
        assert "PCR index is 24, expected 0..23" in bad.stderr.decode()
        text = cli("eventlog", *local, "--replay", "sysfs", *sysfs)
        assert text.returncode == 0, text.stderr
        lines = text.stdout.decode().splitlines()
        assert lines[1] == "entries: 45"
        assert lines[-1] == "replay: ok"
        assert "   44 agent    RTMR3 EV_EVENT_TAG" in lines[45]
        assert lines[45].endswith("example.com Deploy a b c")
        assert "   45 agent    RTMR0 EV_EVENT_TAG" in lines[46]
        as_json = json.loads(cli("eventlog", *local, "--json").stdout)
        assert [e["source"] for e in as_json["entries"]].count("agent") == 2
        assert as_json["entries"][-1]["aael"] == {"domain": "d", "operation": "o", "content": "c"}
        assert as_json["replay"] is None
        quote = json.loads(cli("eventlog", "--socket", daemon.socket, "--replay", "quote", "--json").stdout)
        assert quote["replay"]["ok"] is True
        assert len(quote["entries"]) == 45
        # a register extended behind the agent's back: the replay names the first entry it cannot explain
        fd = os.open(platform.mount.measurements / "rtmr0:sha384", os.O_WRONLY)
        os.pwrite(fd, b"\x42" * 48, 0)
        os.close(fd)
        diverged = cli("eventlog", "--socket", daemon.socket, "--replay", "quote")
        assert diverged.returncode == 1
        assert "RTMR0: 17 entries, MISMATCH" in diverged.stdout.decode()
        assert "replay: diverges at entry 1 (firmware, " in diverged.stdout.decode()
        as_json = json.loads(cli("eventlog", *local, "--replay", "sysfs", *sysfs, "--json").stdout)
        assert as_json["replay"]["divergence"]["rtmr"] == 0
    finally:
        assert daemon.stop() == 0


def test_emulated_measurement_sysfs_behaves_like_the_kernel(platform: Platform) -> None:
    """The emulation the other tests rely on: hw-abi.md §4 semantics, and quotes that follow the registers."""
    folder = platform.mount.measurements
    assert sorted(p.name for p in folder.iterdir()) == [
        "mrconfigid", "mrowner", "mrownerconfig", "mrtd:sha384",
        "rtmr0:sha384", "rtmr1:sha384", "rtmr2:sha384", "rtmr3:sha384",
    ]  # fmt: skip
    template = tdx.parse_quote((GCP / "quote_v4_padded8000.dat").read_bytes())
    assert (folder / "mrtd:sha384").read_bytes() == template.body.mr_td
    assert [(folder / f"rtmr{i}:sha384").read_bytes() for i in range(4)] == list(template.body.rtmrs)
    fd = os.open(folder / "rtmr2:sha384", os.O_WRONLY)
    try:
        for data, offset in ((b"\x01" * 47, 0), (b"\x01" * 49, 0), (b"\x01" * 48, 1)):
            with pytest.raises(OSError, match="Invalid argument"):
                os.pwrite(fd, data, offset)
        assert os.pwrite(fd, b"\x01" * 48, 0) == 48
    finally:
        os.close(fd)
    with pytest.raises(PermissionError):
        os.open(folder / "mrtd:sha384", os.O_WRONLY)
    expected = hashlib.sha384(template.body.rtmrs[2] + b"\x01" * 48).digest()
    assert (folder / "rtmr2:sha384").read_bytes() == expected
    from agent.tee import tsm

    quote = tdx.parse_quote(tsm.get_report(b"\x07" * 64, root=platform.mount.root).outblob)
    assert quote.body.rtmrs[2] == expected
    assert quote.body.report_data == b"\x07" * 64
