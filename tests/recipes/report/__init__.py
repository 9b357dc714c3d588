"""Tests of recipes.report."""
