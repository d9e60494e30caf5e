"""LongAlign reference implementation: the networks and the maths (no command-line code here)."""
