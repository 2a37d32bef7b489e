"""repro: a faithful PyTorch reproduction of Krizhevsky, Sutskever & Hinton (NIPS 2012)."""

__version__ = "0.1.0"
