"""Image data for pre-training and probing: sources, captions, augmentation, generated sets."""
