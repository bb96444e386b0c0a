"""Slide-level evaluation with multiple-instance learning on frozen patch features."""
