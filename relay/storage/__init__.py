"""Storage primitives: durable file writes and the embedded key-value store."""
