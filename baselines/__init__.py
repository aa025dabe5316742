"""Training recipes shipped with kps-bench: installed as package data of ``kps_bench.baselines`` (pyproject.toml)."""
