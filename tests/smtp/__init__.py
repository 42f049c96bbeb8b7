"""Tests of :mod:`mailer.smtp`: sending pace, EHLO name."""
