"""Moving bytes: TCP two-way copy, UDP sessions, rate and slot limits, counters."""
