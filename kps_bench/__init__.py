"""kps-bench: Knowledge Preservation Score benchmark for personalised text-to-image adapters.

Importing the package is cheap: heavy libraries (torch, diffusers, open_clip) load lazily
inside the modules that need them.
"""

__version__ = "0.1.0"

#: Version of the KPS definition written into every results.json (see README, "Metrics").
KPS_VERSION = "1"
