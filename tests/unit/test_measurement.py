"""ExtendRuntimeMeasurement semantics: enabled/supported, PCR index, the log path, the config keys that drive it."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent import config as cfg
from agent.compat.refconfig import parse_aa_config
from agent.errors import ConfigError, InvalidRequest
from agent.measurement import MeasurementResult, RuntimeMeasurement, build_measurement, log_path
from agent.service import AttestationAgent
from agent.tee import eventlog
from agent.tee.journal import Journal
from agent.tee.sample import SampleAttester
from agent.tee.tdx_attester import TdxAttester
from tests.unit.tee.test_journal import FakeRtmrs


class TestConfig:
    def test_defaults(self) -> None:
        e = cfg.Config().eventlog
        assert (e.enabled, e.path, e.init_pcr) == (False, None, 17)

    def test_table(self) -> None:
        e = cfg.from_mapping({"eventlog": {"enabled": True, "path": "/run/x/log", "init_pcr": 8}}).eventlog
        assert (e.enabled, e.path, e.init_pcr) == (True, "/run/x/log", 8)
        assert cfg.from_mapping({"eventlog": {"enabled": True}}).describe()["eventlog"] == {
            "enabled": True,
            "path": None,
            "init_pcr": 17,
        }

    @pytest.mark.parametrize(
        ("table", "message"),
        [
            ({"enabled": "yes"}, "`eventlog.enabled` is 'yes', expected true or false"),
            ({"path": "rel/log"}, "`eventlog.path` is 'rel/log', expected an absolute path"),
            ({"init_pcr": 24}, "`eventlog.init_pcr` is 24, expected a whole number from 0 to 23"),
            ({"enable_eventlog": True}, "`eventlog.enable_eventlog` is not a known key"),
        ],
    )
    def test_bad_values(self, table: dict[str, object], message: str) -> None:
        with pytest.raises(ConfigError, match=re.escape(message)):
            cfg.from_mapping({"eventlog": table})

    def test_reference_aa_keys_map_onto_the_table(self) -> None:
        raw = b"[eventlog_config]\nenable_eventlog = true\ninit_pcr = 9\n"
        e = parse_aa_config(raw, source="aa.toml").eventlog()
        assert (e.enabled, e.path, e.init_pcr) == (True, None, 9)
        assert parse_aa_config(b"", source="aa.toml").eventlog() == cfg.EventlogConfig()

    def test_log_path_precedence(self) -> None:
        default = cfg.Config()
        assert log_path(default, {}) == "/run/attestation-agent/eventlog"
        assert log_path(default, {"AAEL_PATH": "/run/other/log"}) == "/run/other/log"
        keyed = cfg.from_mapping({"eventlog": {"path": "/run/key/log"}})
        assert log_path(keyed, {"AAEL_PATH": "/run/other/log"}) == "/run/key/log"


def enabled_config(tmp_path: Path, **paths: str) -> cfg.Config:
    return cfg.from_mapping(
        {
            "eventlog": {"enabled": True, "path": str(tmp_path / "log")},
            "tee_paths": {"ccel_data": "/nonexistent", **paths},
        }
    )


class TestSupport:
    async def test_not_enabled(self, tmp_path: Path) -> None:
        agent = AttestationAgent(SampleAttester(), None, measurement=build_measurement(cfg.Config(), SampleAttester()))
        assert await agent.extend_runtime_measurement("d", "o", "c", None) is MeasurementResult.NOT_ENABLED
        assert not (tmp_path / "log").exists()

    async def test_sample_is_not_supported(self, tmp_path: Path) -> None:
        measurement = build_measurement(enabled_config(tmp_path), SampleAttester())
        assert measurement.reason == "the sample TEE has no runtime measurement registers this agent can extend"
        agent = AttestationAgent(SampleAttester(), None, measurement=measurement)
        assert await agent.extend_runtime_measurement("d", "o", "c", 17) is MeasurementResult.NOT_SUPPORTED
        assert not (tmp_path / "log").exists()

    async def test_tdx_without_measurement_sysfs_is_not_supported(self, tmp_path: Path) -> None:
        config = enabled_config(tmp_path, tdx_measurements_dir=str(tmp_path / "absent"))
        measurement = build_measurement(config, TdxAttester(config.tee_paths))
        assert "the measurement sysfs needs Linux >= 6.16" in measurement.reason
        assert await measurement.extend("d", "o", "c", None) is MeasurementResult.NOT_SUPPORTED


class TestExtend:
    @pytest.fixture
    def registers(self) -> FakeRtmrs:
        return FakeRtmrs()

    @pytest.fixture
    def journal(self, tmp_path: Path, registers: FakeRtmrs) -> Iterator[Journal]:
        journal = Journal(tmp_path / "log", registers)
        journal.open()
        yield journal
        journal.close()

    async def test_default_register_is_init_pcr(self, journal: Journal, registers: FakeRtmrs) -> None:
        measurement = RuntimeMeasurement(enabled=True, init_pcr=17, journal=journal)
        assert await measurement.extend("d", "o", "c", None) is MeasurementResult.OK
        (event,) = eventlog.parse_agent_log(journal.log_bytes())
        assert event.mr_index == 4
        assert registers.writes == [(3, event.digests[0].digest)]

    async def test_configured_init_pcr(self, journal: Journal, registers: FakeRtmrs) -> None:
        measurement = RuntimeMeasurement(enabled=True, init_pcr=9, journal=journal)
        await measurement.extend("d", "o", "c", None)
        (event,) = eventlog.parse_agent_log(journal.log_bytes())
        assert (event.mr_index, registers.writes[0][0]) == (3, 2)

    async def test_non_default_index_is_recorded_as_the_register_extended(
        self, journal: Journal, registers: FakeRtmrs
    ) -> None:
        # the reference would log MR index 4 (from init_pcr 17) here while extending RTMR0: that entry never replays
        measurement = RuntimeMeasurement(enabled=True, init_pcr=17, journal=journal)
        assert await measurement.extend("d", "o", "c", 1) is MeasurementResult.OK
        (event,) = eventlog.parse_agent_log(journal.log_bytes())
        assert event.mr_index == 1
        assert registers.writes[0][0] == 0
        assert eventlog.replay(eventlog.items((), [event]), registers.values).ok

    async def test_out_of_range_index(self, journal: Journal) -> None:
        measurement = RuntimeMeasurement(enabled=True, journal=journal)
        with pytest.raises(InvalidRequest, match=re.escape("PCR index is 24, expected 0..23")):
            await measurement.extend("d", "o", "c", 24)
        assert journal.log_bytes() == b""

    async def test_pull_image_event_as_the_data_hub_sends_it(self, journal: Journal) -> None:
        content = '{"image":"docker.io/library/busybox:latest", "digest":"sha256:' + "ab" * 32 + '"}'
        agent = AttestationAgent(SampleAttester(), None, measurement=RuntimeMeasurement(enabled=True, journal=journal))
        result = await agent.extend_runtime_measurement(
            "github.com/confidential-containers", "PullImage", content, None
        )
        assert result is MeasurementResult.OK
        (event,) = eventlog.parse_agent_log(journal.log_bytes())
        aael = event.aael()
        assert aael is not None
        assert aael.text == f"github.com/confidential-containers PullImage {content}"


def test_the_default_init_pcr_is_the_event_log_modules_own() -> None:
    """`agent.measurement` keeps its own copy so that it loads no event-log module where measurement is off."""
    from agent import measurement
    from agent.tee import eventlog

    assert measurement.DEFAULT_INIT_PCR == eventlog.DEFAULT_INIT_PCR == cfg.EventlogConfig().init_pcr
    assert RuntimeMeasurement(enabled=False).init_pcr == eventlog.DEFAULT_INIT_PCR
