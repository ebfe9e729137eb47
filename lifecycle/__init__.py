"""What the director and the envoy agree on: a collaborator's states, the orders, their wire form.

`foedus.lifecycle.states` holds a site's collaborator lifecycle (its states and allowed moves, one
table), `foedus.lifecycle.orders` the work a director hands an envoy and the reports an envoy sends
back, `foedus.lifecycle.wire` their conversion from and to director.proto's messages, written once
for both sides' gRPC edges. Nothing here imports a service.
"""
