"""The node agent: runs beside one model instance and takes jobs from the dispatcher."""

__version__ = "0.1.0"
