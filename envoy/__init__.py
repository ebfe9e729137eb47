"""The envoy: the long-lived agent of one site, running its collaborators for a director."""
