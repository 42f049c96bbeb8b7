"""Mail to our inbound domain: VERP bounces, ``mailto:`` unsubscribes, feedback loops (SPEC 12).

:mod:`~mailer.inbound.addresses` (pure) mints and reads the addresses;
:mod:`~mailer.inbound.delivery` decides what one message to one of them does, for both the
SMTP listener (:mod:`~mailer.inbound.server`) and the mailbox poller
(:mod:`~mailer.inbound.imap`).
"""
