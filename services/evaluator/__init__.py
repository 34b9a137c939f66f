"""Evaluator service: eval suites, scorers and statistics."""
