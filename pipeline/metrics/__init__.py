"""Measuring sets of features: distribution metrics (Fréchet distance, precision/recall, linear
probe) and faiss nearest neighbours for audits."""
