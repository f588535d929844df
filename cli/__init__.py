"""The `aimv2` command line: one thin module per command over the `aimv2_mlx` library."""
