"""Certificates for a foedus federation: CA, requests, signing, safe key files and gRPC TLS."""
