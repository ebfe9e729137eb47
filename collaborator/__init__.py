"""The collaborator side: `client.AggregatorGRPCClient` calls the aggregator, `errors` says how it failed."""
