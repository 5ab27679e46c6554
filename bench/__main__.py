"""Run every benchmark: `python -m bench` (or `make bench`)."""

from bench import fleet, pull, rpc, startup

status = rpc.main([]) or startup.main([]) or fleet.main([]) or pull.main(["--size-mib", "256"])
raise SystemExit(status)
