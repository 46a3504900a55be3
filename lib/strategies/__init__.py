"""Active-learning strategies (importance scores). Submodules are imported on demand."""
