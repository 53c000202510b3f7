"""Layer 5, a fine-tuning run: its settings and recipe, its assembly, the loop and one step,
freezing, model EMA, its evaluations, state and resumption, and its report."""
