"""What the gRPC services share to serve: a server's lifetime, the caller's name, metrics.

The aggregator and the director are both a gRPC server over mutual TLS that names each caller by
its certificate and may serve Prometheus metrics beside it; that plumbing is written once here,
while each service's credentials, handlers and rules of who may call stay in its own `server`
and `identity` modules.
"""
