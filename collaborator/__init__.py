"""The collaborator side: `client.AggregatorGRPCClient` calls the aggregator as `settings.ClientSettings` say, `errors` says how it failed."""
