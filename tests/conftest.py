"""Shared fixtures: tiny random models built once per test session, saved and loaded like real ones."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session", autouse=True)
def image_cache(tmp_path_factory):
    """Every test's shared image cache (and DreamBooth class images) lies in a temporary folder, never the user's
    home: ``KPS_BENCH_CACHE`` is set for the session, and inherited by the commands tests start."""
    folder = tmp_path_factory.mktemp("kps-bench-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("KPS_BENCH_CACHE", str(folder))
        yield folder


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """Folder with tiny pipeline/, clip/, dino/, references/, lora/, textual-inversion/ and tiny.yaml."""
    from kps_bench.tiny import build_all

    out = tmp_path_factory.mktemp("tiny")
    build_all(out)
    return out


@pytest.fixture(scope="session")
def tiny_protocol(tiny):
    return tiny / "tiny.yaml"
