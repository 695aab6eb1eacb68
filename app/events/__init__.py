"""The event log's readers: the feed, waiting for a task to settle, the live
stream, and the wake-up bus they share. Events are written by
`app.services.events` only."""
