"""Run every benchmark: `python -m bench` (or `make bench`)."""

from bench import rpc

raise SystemExit(rpc.main())
