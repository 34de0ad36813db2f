"""anomcli: unsupervised visual inspection of industrial surfaces (`anom` CLI)."""

__version__ = "0.1.0"
