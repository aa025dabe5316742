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


@pytest.fixture
def protocol_copy(tiny, tmp_path):
    """``make(**changes)``: the tiny protocol with top-level ``changes``, written to ``tmp_path/p.yaml`` with absolute
    paths to the tiny models (references given as absolute paths are kept)."""
    import yaml

    def make(**changes):
        d = yaml.safe_load((tiny / "tiny.yaml").read_text())
        d.update(changes)
        d["base_model"] = str(tiny / d["base_model"])
        d["encoders"]["clip"] = {k: str(tiny / v) for k, v in d["encoders"]["clip"].items()}
        d["encoders"]["dino"]["model"] = str(tiny / d["encoders"]["dino"]["model"])
        for s in d["subjects"]:
            s["references"] = str(tiny / s["references"])  # unchanged when absolute
        path = tmp_path / "p.yaml"
        path.write_text(yaml.safe_dump(d))
        return path

    return make
