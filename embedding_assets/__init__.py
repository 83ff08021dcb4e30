"""Keep a FAQ's embeddings fresh: a Dagster code location and a retrieval module."""
