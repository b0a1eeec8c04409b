"""Helpers shared by the test modules: servers, training runs, data."""
