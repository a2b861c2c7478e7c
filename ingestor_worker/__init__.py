"""The ingestor worker service, the dead-letter tools and the command line."""
