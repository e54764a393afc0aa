"""Evaluation of trained policies against their reference."""
