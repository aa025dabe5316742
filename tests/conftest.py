"""Shared fixtures: tiny random models built once per test session, saved and loaded like real ones."""

from __future__ import annotations

import pytest


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
