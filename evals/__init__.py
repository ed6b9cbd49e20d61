"""Evaluations of the method on worlds with ground truth (see docs/toyworld.md)."""
