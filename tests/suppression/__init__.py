"""Tests of the pure policy core in :mod:`suppression`."""
