"""Data: readers of public click-log formats, the synthetic generator, preparation, batching."""
