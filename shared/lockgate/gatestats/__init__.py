"""Statistics the evaluator, the gate and the rollout analysis share, so their numbers agree (pure)."""
