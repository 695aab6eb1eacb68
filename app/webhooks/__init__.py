"""Signed webhooks to callers: endpoints, the delivery outbox and its worker.

Deliveries are written by `app.services.events` (the one event writer) in the
transaction of each event; everything else about them lives here.
"""
