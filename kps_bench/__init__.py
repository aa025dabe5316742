"""kps-bench: Knowledge Preservation Score benchmark for personalised text-to-image adapters.

Importing the package is cheap: heavy libraries (torch, diffusers, open_clip) load lazily
inside the modules that need them.
"""

__version__ = "0.1.0"

#: Version of the metric definitions written into every results.json (see README, "Metrics"): 2 adds the
#: chance-corrected scores (kps_gain and its parts) beside kps, whose formula (version 1) is unchanged.
KPS_VERSION = "2"
