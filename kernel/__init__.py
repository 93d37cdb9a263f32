"""The kernel every stage stands on: settings, domain types, typed errors, keyed hashing. Imports nothing of the project."""
