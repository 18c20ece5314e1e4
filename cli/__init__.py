"""The ``atc`` command line: thin wiring over the ``compressor`` library."""
