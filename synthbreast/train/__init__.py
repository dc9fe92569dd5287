"""Training loops, losses and checkpoints."""
