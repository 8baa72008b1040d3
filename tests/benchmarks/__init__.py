"""Benchmarks: every figure is a ratio against a floor measured in the same run.

Run from the repository root: ``python -m tests.benchmarks`` (``--help`` for options). Not collected by
pytest (``--ignore=tests/benchmarks`` in the project's addopts).
"""
