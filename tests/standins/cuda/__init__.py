"""The `cuda` package of cuda-python, replaced by stand-ins (see tests/standins/README.md)."""
