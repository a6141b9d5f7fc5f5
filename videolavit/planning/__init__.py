"""Memory, FLOPs and time plans of training runs, computed before any hardware is used."""
