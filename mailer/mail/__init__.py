"""Building mail (pure): templates, headers, text part, MIME, DKIM."""
