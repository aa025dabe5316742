"""Recipe searches shipped with kps-bench (``kps-bench tune --search NAME``), installed as package data of
``kps_bench.searches`` (pyproject.toml); ``./searches`` and ``$KPS_BENCH_SEARCHES`` are searched first."""
