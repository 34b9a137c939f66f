"""Provenance: signed alias histories, artifact lifecycles, OpenLineage export, run environments, attestations."""
