"""Child processes the services run: each in its own session, its exit status durable, its log kept.

The director's aggregators and the envoy's collaborators are both commands that must outlive a
restart of the service that started them and never run twice; how that is done is one concern,
written once here, below both services.
"""
