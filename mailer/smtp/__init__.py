"""Building blocks for talking to SMTP relays: sending pace, EHLO name, relay limits."""
