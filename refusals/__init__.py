"""The ways a foedus service refuses a call, and the one table per protocol that answers each.

The aggregator, the director and the envoy's site API refuse for the same reasons (who is calling,
what they may do, what they sent, what exists, what the state allows, how much); the reasons are one
hierarchy (`foedus.refusals.errors`), raised by plain Python that knows no protocol, and each
protocol's edge answers them from one table: `foedus.refusals.grpc` for the gRPC services,
`foedus.refusals.http` for the dashboard and the site API. A leaf: it imports nothing of foedus, so
any package (the wire's codec and stream reader too) may raise its refusals.
"""
