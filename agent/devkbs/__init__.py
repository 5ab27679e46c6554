"""agent.devkbs."""
