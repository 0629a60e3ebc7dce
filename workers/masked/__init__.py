"""Mask-aware Flux Fill inference: cache a template's activations once, then compute only masked tokens."""
