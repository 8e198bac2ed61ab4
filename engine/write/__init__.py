"""The path of an event once validated: one writer thread (writer.py) orders every mutation; a group commit
(group_commit.py) plans, appends to the store, applies to the state and only then completes the callers;
checkpoints are scheduled and written beside it; recovery replays the log through the same apply functions."""
