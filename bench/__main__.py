"""Run every benchmark: `python -m bench` (or `make bench`)."""

from bench import pull, rpc, startup

status = rpc.main([]) or startup.main([]) or pull.main(["--size-mib", "256"])
raise SystemExit(status)
