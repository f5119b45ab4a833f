"""Building blocks every layer uses: errors, atomic files, the artifact cache, precision, DDP collectives, signals, the config-schema machinery, loggers."""
