"""Serving: the Open Inference Protocol and task endpoints on Ray Serve, and Triton model repositories."""
