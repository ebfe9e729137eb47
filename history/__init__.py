"""The aggregator's history of a federation: `metrics.jsonl`, one row per closed round."""
