"""The quality lab: a small trained DiT, a lab feature network, metrics and the FP8 quality gate."""
