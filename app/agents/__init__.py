"""Agents: which adapter answers in a company's conversations."""
