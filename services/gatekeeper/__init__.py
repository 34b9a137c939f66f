"""Gatekeeper service: threshold policies over eval results, decisions in KV and the audit log."""
