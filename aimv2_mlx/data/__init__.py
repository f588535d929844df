"""Input side of `embed`: finding images (sources) and decoding them beside the model (pipeline)."""
