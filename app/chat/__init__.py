"""Conversations, messages, edits and the history an agent is given."""
