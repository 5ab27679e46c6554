"""Run every benchmark: `python -m bench` (or `make bench`)."""

from bench import fleet, rpc, startup

status = rpc.main([]) or startup.main([]) or fleet.main([])
raise SystemExit(status)
