"""Tests of recipes.tools."""
