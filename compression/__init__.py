"""Fewer bytes on the wire: the codes a plan's `compression` section may name, in plain numpy.

Each code turns a tensor's values (a model's, or a site's update delta from the global model it
trained on) into bytes and back, deterministically: the same bytes decode to the same values on
any run, so a federation resumed after kill -9 ends as its undisturbed run. Decoders trust
nothing they are given: sizes are checked before anything is inflated or allocated. No socket
and no protobuf here: `foedus.protos` carries what these make.
"""
