"""The feedback loop: what was shown and what came of it (impressions.py)."""
