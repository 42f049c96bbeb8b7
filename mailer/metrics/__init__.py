"""What ``/metrics`` shows beyond the outbox gauges (SPEC 7): counters derived from the
database, and the SMTP histogram workers share through Redis."""
