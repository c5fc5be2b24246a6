"""Extraction, storage, export and the read endpoint. Imports neither mitmproxy nor Textual."""
