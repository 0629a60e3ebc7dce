"""Activation cache for masked image editing.

A warm-up inference stores per-step, per-block activations (attention K/V or hidden states) of
every image token. Masked edits of the same template read the unmasked tokens from this cache.
The package owns where those activations live (host memory, then disk), what is evicted, how
they are compressed and how they reach the compute ahead of time.
"""
