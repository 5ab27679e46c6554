"""agent.kbs."""
