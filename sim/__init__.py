"""Simulated fleets: emulation over a real broker and a discrete-event mode."""
