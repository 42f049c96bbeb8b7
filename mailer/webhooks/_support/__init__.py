"""What the provider modules share: configuration, errors, the event vocabulary, payload
reading, replay stores, SNS signatures, status classification and timestamps.

Private to :mod:`mailer.webhooks`; everything outside reaches it through that package.
"""
