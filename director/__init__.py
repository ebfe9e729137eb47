"""The director: a long-lived service that runs federations for people (see protos/director.proto)."""
