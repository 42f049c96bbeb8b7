"""Outbound event webhooks: telling the services that send through us what happened (SPEC 13).

How an event travels, and why each step is where it is:

1. **Written with the change.** Every state change that raises an event (a message sent,
   deferred, failed, unknown, suppressed, bounced or complained, a person's own unsubscribe,
   a campaign completed) calls :mod:`mailer.events.record` on the connection of its own
   transaction. The event row, and one delivery row per endpoint that wants its type,
   commit or roll back with the change: a process killed a moment later loses nothing, and
   a rolled-back change announces nothing.
2. **Fanned out at write time.** The endpoints are read in that transaction (a small table)
   so that each endpoint's delivery has its own retry state: one failing receiver never
   holds back another, and nothing is written at all when no endpoint wants the type.
3. **Delivered in the background.** The scheduler's delivery thread
   (:mod:`mailer.events.delivery`) claims due deliveries under a lease, signs each
   attempt as Standard Webhooks do, posts it with a 10 s limit and no redirects, to an
   address it resolved and checked itself (:mod:`mailer.events.targets`), and records the
   result. Failures back off per endpoint (:mod:`mailer.events.retry`) for at least 24 hours.
   Never inside an API request.
"""
