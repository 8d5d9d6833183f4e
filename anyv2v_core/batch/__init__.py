"""Batch edits: `python -m anyv2v_core batch JOBS.jsonl --out DIR [--ray auto|ADDRESS]`.

jobs.py reads and validates the jobs (one edit per JSON line, keyed by the `edit` options of
`anyv2v_core/options.py`) before any model loads; store.py keeps the results, the failures and the
inversion cache on disk; worker.py runs jobs with the engine, in this process or as the body of
each Ray actor; progress.py counts and draws what has ended; runner.py runs a batch in this process
or hands it to ray_runner.py, which spreads it over Ray actors. Only ray_runner.py imports Ray.
"""
