"""Batch edits: `python -m anyv2v_core batch JOBS.jsonl --out DIR [--ray auto|ADDRESS]`.

jobs.py reads and validates the jobs (one edit per JSON line, keyed by the `edit` options) before
any model loads; store.py keeps the results, the failures and the inversion cache on disk;
runner.py runs the jobs with the engine, in this process or as the body of each Ray actor;
ray_runner.py spreads them over Ray actors. Only ray_runner.py imports Ray.
"""
