"""Outbound webhooks: every status change POSTed, signed (Standard Webhooks), to the
endpoints an organization configures through the API. `core` is the pure part (bodies,
signatures, back-off, target checks); `sender` is the role that delivers."""
