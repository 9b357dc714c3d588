"""Tests of recipes.cli."""
