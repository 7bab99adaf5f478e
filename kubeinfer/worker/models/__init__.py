"""Model definitions and checkpoint loaders for the engine."""
