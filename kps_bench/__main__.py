"""``python -m kps_bench`` runs the CLI (also what ``accelerate launch -m kps_bench ...`` starts)."""

from .cli import main

main()
