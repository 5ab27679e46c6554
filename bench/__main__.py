"""Run every benchmark: `python -m bench` (or `make bench`)."""

from bench import rpc, startup

status = rpc.main([]) or startup.main([])
raise SystemExit(status)
