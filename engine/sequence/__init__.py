"""The sequence user tower at serving time (tower.py); trained offline by engine/offline/sequence.py."""
