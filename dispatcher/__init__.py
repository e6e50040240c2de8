"""The dispatcher: the one public endpoint that queues tasks and spreads them over nodes."""

__version__ = "0.1.0"
