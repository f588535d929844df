"""Image data: finding images (sources), decoding them beside the model (pipeline), and for
pre-training captioned sources, augmentation and the generated shapes set."""
