"""Read replicas: processes that serve reads from the state the primary's log gives (follower.py), woken by the
primary after each commit (wakeup.py)."""
