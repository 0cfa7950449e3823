"""Agent classes the reliability tests run with ``--agent tests.agents.hostile:...``."""
