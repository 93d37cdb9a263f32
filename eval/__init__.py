"""Offline evaluation: replay logged impressions through the same core the endpoint serves."""
