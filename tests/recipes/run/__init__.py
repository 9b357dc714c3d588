"""Tests of recipes.run."""
