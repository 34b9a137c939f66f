"""Traffic router: OpenAI-compatible gateway with sticky canary splits and gate-driven rollouts."""
