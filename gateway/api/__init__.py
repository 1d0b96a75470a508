"""HTTP layer: OpenAI wire format, validation, SSE framing, error envelope."""
