"""llmtap: a transparent LLM proxy that records every exchange into DuckDB."""

__version__ = "0.1.0"
