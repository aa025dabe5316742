"""Validity studies shipped with kps-bench (``kps-bench validate --study NAME``), installed as package data of
``kps_bench.studies`` (pyproject.toml); ``./studies`` and ``$KPS_BENCH_STUDIES`` are searched first."""
