"""The fold formulas: numpy arrays in, numpy arrays out, float64."""
