"""lockgate: CI/CD and runtime governance for language-model applications."""

__version__ = "0.1.0"
