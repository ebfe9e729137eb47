"""What the director and the envoy agree on: a collaborator's states, the orders, their wire form.

`lifecycle.states` holds a site's collaborator lifecycle (its states and allowed moves, one
table), `lifecycle.orders` the work a director hands an envoy and the reports an envoy sends back,
`lifecycle.wire` their conversion from and to director.proto's messages, written once for both
sides' gRPC edges. Nothing here imports a service.
"""
