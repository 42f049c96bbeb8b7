"""Campaigns: lifecycle, audience, fan-out, the scheduler's tick."""
