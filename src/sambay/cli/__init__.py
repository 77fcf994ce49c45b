"""Command-line interface: `sambay generate`, `sambay chat` (see `sambay.cli.__main__`)."""
