"""The provider's task error codes, sorted by what a caller should do about them.

From the provider family's published error-code list: some codes mean the
request itself must change, others a passing problem worth a later retry of
the same request. The service's own codes are sorted the same way.
"""

from __future__ import annotations

# The request must change before it can succeed.
CALLER_FIXABLE = frozenset(
    {
        "content_policy_violation",
        "invalid_parameters",
        "image_processing_error",
        "image_dimension_mismatch",
        "request_cancelled",
        "cancelled",
    }
)
# Worth resubmitting unchanged later.
RETRY_LATER = frozenset(
    {
        "generation_failed_no_content",
        "service_error",
        "generation_timeout",
        "resource_exhausted",
        "quota_exceeded",
        "service_unavailable",
        "resource_not_found",
        "unknown_error",
        # Submit refusals that are about the service's account, not the request.
        "unauthorized",
        "permission_denied",
        "rate_limit_exceeded",
        "internal_error",
        # The service's own: the provider never told the outcome.
        "no_outcome",
        "upstream_not_found",
        "submission_outcome_unknown",
    }
)


def retryable(code: str | None) -> bool | None:
    """True: resubmit later as is; False: change the request; None: not a code we know."""
    if code is None:
        return None
    if code in CALLER_FIXABLE:
        return False
    if code in RETRY_LATER:
        return True
    return None
