"""Protocol files shipped with kps-bench: installed as package data of ``kps_bench.protocols`` (pyproject.toml)."""
