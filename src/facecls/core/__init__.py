"""Plumbing every layer uses: errors, console, download and hashing, ONNX files, checkpoints, the run folder."""
