"""Benchmarks of the app, run from the repository root as modules: ``python -m bench.<script>``.

Results are written under ``bench/out/`` and summarised in ``bench/RESULTS.md``.
"""
