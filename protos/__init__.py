"""The wire: OpenFL 1.9's aggregator protocol, its generated code, and numpy <-> protobuf codecs."""
