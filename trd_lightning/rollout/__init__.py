"""Rollouts: sampling responses and assembling the student and teacher sequences."""
