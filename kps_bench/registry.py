"""The metrics registry: every metric kps-bench reports, what it is computed from, and how to read it.

protocol.py (the names a protocol's ``metrics:`` may list), evaluate.py (what to compute), leaderboard.py (columns,
ground-truth columns, which way is better) and cli.py (the run summary) all read this one table. A protocol names
metric *families* (``identity``, ``diversity``, ...); each family enables the metrics whose ``enabled_by`` it is, and
only those (with the metrics they are computed from) are computed. Importing this module is cheap (no torch).
"""

from __future__ import annotations

from dataclasses import dataclass

#: The names a protocol's ``metrics:`` may list, in the order of the default (the order is part of protocol hashes).
PROTOCOL_METRICS = ("kps", "identity", "preservation", "clip_i", "clip_t", "dino", "diversity", "vendi")

#: The image sets of a subject that leaf metrics read: references, and base/adapter images of trigger prompts and of
#: trigger-free prompts (seed-paired between base and adapter).
IMAGE_SETS = ("reference", "base_trigger", "adapter_trigger", "base_free", "adapter_free")


@dataclass(frozen=True)
class Metric:
    """One reported metric.

    ``enabled_by``: the protocol metric that enables it (None: ground truth of the shapes world, shown when a run has
    it). ``version``: the kps_version that introduced its formula. ``column``: a column of leaderboards and of the
    run summary. A *derived* metric has ``inputs`` (other metrics) and a ``formula`` (a function of
    :mod:`kps_bench.metrics` applied to the inputs in order); a *leaf* reads ``encoders`` embeddings of ``images``
    sets. ``truth``: the per-subject field of ``kps-bench world truth`` a ground-truth metric shows."""

    name: str
    enabled_by: str | None
    higher_is_better: bool = True
    version: int = 1
    column: bool = False
    inputs: tuple[str, ...] = ()
    formula: str = ""
    encoders: tuple[str, ...] = ()
    images: tuple[str, ...] = ()
    truth: str = ""


_TRIGGER = ("adapter_trigger", "reference")
_FREE = ("base_free", "adapter_free")

METRICS: dict[str, Metric] = {m.name: m for m in (
    Metric("kps", "kps", column=True, inputs=("identity", "preservation"), formula="kps"),
    Metric("kps_gain", "kps", version=2, column=True, inputs=("identity_gain", "preservation_gain"),
           formula="kps_gain"),
    Metric("identity", "identity", column=True, encoders=("clip",), images=_TRIGGER),
    Metric("identity_base", "identity", version=2, encoders=("clip",), images=("base_trigger", "reference")),
    Metric("identity_ceiling", "identity", version=2, encoders=("clip",), images=("reference",)),
    Metric("identity_gain", "identity", version=2, column=True,
           inputs=("identity", "identity_base", "identity_ceiling"), formula="gain"),
    Metric("preservation", "preservation", column=True, encoders=("clip",), images=_FREE),
    Metric("preservation_floor", "preservation", version=2, encoders=("clip",), images=("base_free",)),
    Metric("preservation_gain", "preservation", version=2, column=True,
           inputs=("preservation", "preservation_floor"), formula="preservation_gain"),
    Metric("clip_i", "clip_i", column=True, encoders=("clip",), images=_TRIGGER),
    Metric("clip_t", "clip_t", column=True, encoders=("clip",), images=("adapter_trigger",)),
    Metric("dino", "dino", column=True, encoders=("dino",), images=_TRIGGER),
    Metric("diversity_base", "diversity", encoders=("dino",), images=("base_free",)),
    Metric("diversity_adapter", "diversity", encoders=("dino",), images=("adapter_free",)),
    Metric("diversity_ratio", "diversity", column=True, inputs=("diversity_adapter", "diversity_base"),
           formula="ratio"),
    Metric("vendi_base", "vendi", encoders=("dino",), images=("base_free",)),
    Metric("vendi_adapter", "vendi", encoders=("dino",), images=("adapter_free",)),
    Metric("vendi_ratio", "vendi", column=True, inputs=("vendi_adapter", "vendi_base"), formula="ratio"),
    Metric("gt_identity", None, column=True, truth="true_identity"),
    Metric("gt_leakage", None, higher_is_better=False, column=True, truth="true_leakage"),
    Metric("gt_knowledge_shift", None, higher_is_better=False, column=True, truth="true_knowledge_shift"),
    Metric("gt_diversity_ratio", None, column=True, truth="true_diversity_ratio"),
)}

#: The columns of leaderboards and of the run summary that runs compute (shown when every run has them).
COLUMNS = tuple(m.name for m in METRICS.values() if m.column and not m.truth)
#: The ground-truth metrics (leaderboard columns shown when the runs have them).
GROUND_TRUTH = tuple(m for m in METRICS.values() if m.truth)


def reported(protocol_metrics) -> list[str]:
    """The metrics a protocol with ``metrics: protocol_metrics`` reports, in registry order."""
    return [m.name for m in METRICS.values() if m.enabled_by in protocol_metrics]


def closure(names) -> list[str]:
    """``names`` and every metric they are computed from, in registry order."""
    need: set[str] = set()

    def add(name: str) -> None:
        if name not in need:
            need.add(name)
            for i in METRICS[name].inputs:
                add(i)

    for n in names:
        add(n)
    return [m for m in METRICS if m in need]


def encoders_needed(protocol_metrics) -> set[str]:
    """The encoders (``clip``, ``dino``) whose embeddings the protocol's metrics read."""
    return {e for n in closure(reported(protocol_metrics)) for e in METRICS[n].encoders}


def image_sets(name: str) -> set[str]:
    """The image sets a metric reads, through its inputs."""
    m = METRICS[name]
    return set(m.images).union(*(image_sets(i) for i in m.inputs))
