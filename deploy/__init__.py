"""Deployments of streamrec on existing cluster engines (optional extras): ray.py (Ray Serve)."""
