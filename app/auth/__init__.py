"""API keys, sessions and the authenticated principal."""
