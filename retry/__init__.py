"""What every client of ours retries, and how long it waits: the statuses and the backoff, once.

The collaborator's calls to its aggregator and the envoy's calls to its director retry the same
statuses with the same capped exponential backoff and full jitter (`foedus.retry.backoff`).
"""
