"""Helpers shared by the test modules (tests import these, never each other)."""
