"""Mechanism layer: what moves data (dispatcher, expert bank, collectives, expert compute)."""
