"""Data: the run's datasets and partitions (``datasets``) and a device's own files (``local``)."""
