"""Deciding what folds where (one named reason for every layer kept) and rewriting the net accordingly."""
