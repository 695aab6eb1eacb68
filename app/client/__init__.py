"""`imagetasks submit|list|show|image`: talk to a running service, for people and scripts.

Results go to stdout, progress and errors to stderr, so `--json` output pipes cleanly.
"""

from app.client.commands import register

__all__ = ["register"]
