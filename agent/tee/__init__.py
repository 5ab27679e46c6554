"""agent.tee."""
