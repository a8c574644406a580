"""Companies (tenants): created by operators from the CLI."""
