"""Lineage recorder: artifacts, releases, runs, evals, gates and rollouts as one graph."""
