"""The integration fixtures (dev KBS over loopback, resources) for the reliability suite."""

from __future__ import annotations

from tests.integration.conftest import dev_kbs, resources

__all__ = ["dev_kbs", "resources"]
