"""Seeded synthetic multi-session world in LoCoMo's schema, with gold facts and operations."""
from .generate import generate_conversation, generate_world, write_world

__all__ = ["generate_conversation", "generate_world", "write_world"]
