"""`serve`'s KBS preload is an optimisation: when it fails, the agent says so once and keeps serving."""

from __future__ import annotations

import pytest
from structlog.testing import capture_logs

from agent import app as app_module
from agent.config import Config, KbsConfig
from agent.kbs import client


async def test_a_failed_preload_is_one_warning_and_close_still_works(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken() -> None:
        raise ImportError

    monkeypatch.setattr(client, "preload", broken)
    monkeypatch.setattr(app_module, "PRELOAD_DELAY_S", 0.0)
    app = app_module.App(Config(kbs=KbsConfig(url="http://127.0.0.1:9")))
    with capture_logs() as logs:
        await app._preload_kbs()
    assert [(e["event"], e["error"]) for e in logs] == [("kbs.preload.failed", "ImportError")]
