"""Retrieval stage: catalog files, embeddings, the Chroma ad store, behavioural priors, candidates."""
