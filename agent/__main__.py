"""`python -m agent` runs the `cvm-agent` command."""

from agent.cli import main

raise SystemExit(main())
