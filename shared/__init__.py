"""The event contract shared by the saver and the ingestor worker.

Pure code, no I/O: the envelope and its codec, message framing and chunking,
deterministic ids, and the row model that lands in Kusto.
"""
