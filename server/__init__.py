"""HTTP layer: wire models, error mapping, the app factory. Translates HTTP to calls into the core."""
