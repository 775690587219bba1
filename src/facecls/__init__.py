"""facecls: train, evaluate and compare face identity classifiers."""

__version__ = "0.1.0"
