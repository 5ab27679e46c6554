"""agent.api."""
