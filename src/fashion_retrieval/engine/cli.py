def train():
    """Train a model from a YAML recipe (not yet implemented)."""
    raise SystemExit("not implemented yet")


def evaluate():
    """Evaluate a checkpoint on a benchmark (not yet implemented)."""
    raise SystemExit("not implemented yet")


def demo():
    """Train a small model on the shared data and evaluate it (not yet implemented)."""
    raise SystemExit("not implemented yet")
