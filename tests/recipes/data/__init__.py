"""Tests of recipes.data."""
