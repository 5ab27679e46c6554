"""agent.keyprovider."""
