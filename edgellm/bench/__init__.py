"""Measurement: perplexity and speed, edgellm beside llama.cpp through the same code."""
