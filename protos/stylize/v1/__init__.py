"""Generated code of stylize.v1 (regenerate with scripts/gen_protos.py)."""
