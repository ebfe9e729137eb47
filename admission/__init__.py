"""How much of a service one caller may hold: its calls at once, and time for a stream it sends.

The aggregator (per collaborator) and the director (per certificate name, and per role) both refuse
a call past its caller's share before doing any work, and both end a client stream that stops
sending; the mechanism is one concern, written once in `foedus.admission.calls`, while each service
gives it its own limits, words and errors (`foedus.aggregator.admission`; `foedus.director.capacity`
for calls and `foedus.director.servicer` for streams).
"""
