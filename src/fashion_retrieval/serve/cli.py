def serve():
    """Serve an index over HTTP (not yet implemented)."""
    raise SystemExit("not implemented yet")
