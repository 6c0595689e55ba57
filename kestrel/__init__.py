"""Kestrel: a self-hosted interpretability service for language models."""

__version__ = "0.1.0"
