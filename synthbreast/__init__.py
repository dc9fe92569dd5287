"""synthbreast: synthetic breast-cancer images and the evidence of how good they are."""

__version__ = "0.1.0"
