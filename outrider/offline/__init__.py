"""offline/: learning policies from stored trajectories and preferences, with no sampling during training (OPPO [38] and its baselines)."""
