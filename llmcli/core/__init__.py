"""The shared model core: configs, weights, tokenizers, architectures, sampling and generation.

Knows nothing of Typer, Rich, stdin or stdout; usable from plain Python and inside a Ray worker.
"""
