"""Routing addon, in-process relay and upstream client: everything that touches mitmproxy."""
