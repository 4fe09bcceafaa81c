"""Checking a merged model against its original: engines and comparison."""
