"""Speculative decoding: SpecExec token trees built by a resident draft and checked by the target in one pass."""
