"""What the services' durable state shares: SQLite used the same way, files written atomically.

The aggregator, the director and the envoy each keep state that must survive kill -9; how a
transaction commits, how a state folder is locked and how a file lands on disk is one concern,
written once here, while each service's schema and lifecycle stay in its own `state` module.
"""
