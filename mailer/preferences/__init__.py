"""The recipient's rights: opt-in, links, unsubscribe, erasure, export."""
