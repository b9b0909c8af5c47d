"""Nearest-neighbour indexes over embedding folders."""
