"""Sockets: listeners and options, DNS resolution, target dialling, TLS."""
