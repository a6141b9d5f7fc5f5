"""Reading the public Video-LaVIT release (its directory layout and pickled `.bin` state dicts)."""
