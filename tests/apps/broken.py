"""A worker that fails at start, every time (for clusterkit up's error path)."""

raise RuntimeError("this worker cannot start")
