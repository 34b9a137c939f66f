"""Drift monitor: reference vs current windows of inference features per deployment."""
