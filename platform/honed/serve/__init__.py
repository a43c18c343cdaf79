"""Ray Serve: the OpenAI-compatible endpoint."""
