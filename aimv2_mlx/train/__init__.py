"""AIMv2 pre-training: config and presets, optimizer, batches, the compiled step, checkpoints,
loop.
"""
