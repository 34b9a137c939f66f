"""Development tooling for lockgate: the simulated LLM upstream and the demo. Never imported by
production code; its commands reach the `lockgate` CLI through the `lockgate.cli` entry point."""
